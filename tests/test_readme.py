"""README.md stays true: every ``kalm-fast`` command it shows parses with today's command line, every
``python -m`` module it names exists, every Python example compiles and imports what exists, and the examples that
need neither a GPU nor files of the user's run as written (device "cuda" made "cpu", bf16 made fp32)."""
import re
import shlex
from pathlib import Path

import pytest

from kalm_fast.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _kalm_fast_commands() -> list:
    """``kalm-fast ...`` lines of the bash blocks (``torchrun ... -m kalm_fast.cli`` ones too) and whole commands
    written inline (a subcommand plus flags), comments dropped."""
    lines = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    lines = [re.sub(r"^torchrun .*?-m kalm_fast\.cli ", "kalm-fast ", line) for line in lines]
    inline = [span for span in re.findall(r"`(kalm-fast [^`]*)`", README) if " --" in span]
    return list(dict.fromkeys(line for line in lines + inline if line.startswith("kalm-fast ")))


def _python_blocks() -> dict:
    """The Python examples by their first import line (a stable name for the test ids)."""
    return {block.splitlines()[0] + f" (#{i})": block for i, block in enumerate(_blocks("python"))
            if not block.startswith(">>>")}


def test_the_readme_shows_commands_and_examples():
    assert len(_kalm_fast_commands()) >= 15 and len(_python_blocks()) >= 7


@pytest.mark.parametrize("command", _kalm_fast_commands(), ids=lambda command: command[len("kalm-fast "):])
def test_every_kalm_fast_command_parses(command):
    """Options in [brackets] are optional: each is parsed too (the brackets dropped)."""
    argv = shlex.split(command.replace("[", "").replace("]", ""))[1:]
    name = argv[0]
    if name.startswith("-"):  # kalm-fast --version / --help: argparse exits 0
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args(argv)
        assert done.value.code == 0
        return
    assert name in COMMANDS, f"README names an unknown subcommand: {command}"
    args, extra = build_parser(name).parse_known_args(argv)
    assert not extra, f"{command}: unknown arguments {extra}"


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python -m (benchmarks\.\w+|kalm_fast[\w.]*)", README))))
def test_every_python_module_it_runs_exists(module):
    path = ROOT / module.replace(".", "/")
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module


@pytest.mark.parametrize("script", sorted(set(re.findall(r"python (examples/\S+\.py)", README))))
def test_every_example_script_it_runs_exists(script):
    assert (ROOT / script).is_file(), script


# examples run as written on the CPU: the attention example after "cuda" -> "cpu" and bf16 -> fp32, as its own
# comment says; the encode example without its last line (a path of the user's)
_RUNNABLE = {"ops import focal_infonce": lambda code: code,
             "from kalm_fast.ops import mean_pool": lambda code: code,
             "from kalm_fast.ops import Varlen": lambda code: code.replace('"cuda"', '"cpu"').replace(
                 "torch.bfloat16", "torch.float32"),
             "enc = Encoder()": lambda code: "\n".join(line for line in code.splitlines() if "/path/to" not in line)}


@pytest.mark.parametrize("name", list(_python_blocks()))
def test_every_python_example_compiles_and_imports(name):
    code = _python_blocks()[name]
    compile(code, name, "exec")
    imports = "\n".join(line for line in code.splitlines() if line.startswith(("import ", "from ")))
    if "import mteb" in imports:
        pytest.importorskip("mteb")
    exec(compile(imports, name, "exec"), {})
    runnable = [adapt for marker, adapt in _RUNNABLE.items() if marker in code]
    if runnable:
        exec(compile(runnable[0](code), name, "exec"), {})


def test_the_runnable_examples_are_found():
    """A renamed example must not silently stop running."""
    for marker in _RUNNABLE:
        assert sum(marker in code for code in _python_blocks().values()) == 1, marker
