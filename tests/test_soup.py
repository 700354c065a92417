"""model_soup: weighted averages, dtypes kept, sharded directories, clear errors, nothing written on error."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kalm_fast
from kalm_fast.train.soup import model_soup


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 6, generator=g), "b.half": torch.randn(5, generator=g).half(),
            "c.bf16": torch.randn(3, 2, generator=g).bfloat16(), "d.ids": torch.arange(7),
            "e.scalar": torch.tensor(float(seed)), "f.empty": torch.zeros(0, 3)}


def _files(tmp_path, n=3):
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"ck{i}.safetensors")
        save_file(_tensors(i), str(paths[-1]), metadata={"format": "pt"})
    return paths


def _expected(weights, names_from=0):
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    ts = [_tensors(i) for i in range(len(weights))]
    out = {}
    for k, t in ts[names_from].items():
        if t.dtype.is_floating_point:
            out[k] = sum(wi * x[k].float() for wi, x in zip(w, ts)).to(t.dtype)
        else:
            out[k] = t
    return out


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0], [0.0, 1.0, 0.0]])
def test_files_weighted_average_keeps_dtypes(tmp_path, weights):
    out = model_soup(_files(tmp_path), weights=weights, output=tmp_path / "soup.safetensors")
    got = load_file(str(out))
    want = _expected(weights or [1, 1, 1])
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        tol = 1e-6 if want[k].dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=tol, rtol=tol)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def _model_dir(path, seed, shards):
    """A sharded model directory with index, config, tokenizer and a sentence-transformers module dir."""
    path.mkdir()
    t = _tensors(seed)
    names = sorted(t)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {k: t[k] for k in names[s::shards]}
        save_file(part, str(path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    (path / "tokenizer.json").write_text("{}")
    (path / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "1_Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling/config.json").write_text("{}")
    (path / "optimizer_junk").mkdir()  # not named in modules.json: not copied
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_directories_sharded(tmp_path, shards):
    dirs = [_model_dir(tmp_path / f"m{i}", i, shards) for i in range(2)]
    out = model_soup(dirs, weights=[1, 3], output=tmp_path / "soup")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in dirs[0].iterdir()
                                                           if p.name != "optimizer_junk")
    assert json.loads((out / "config.json").read_text()) == {"seed": 0}
    assert (out / "1_Pooling/config.json").is_file()
    got = {}
    for f in out.glob("*.safetensors"):
        part = load_file(str(f))
        assert set(part) == {k for k in load_file(str(dirs[0] / f.name))}  # same shard layout
        got.update(part)
    want = _expected([1, 3])
    for k in want:
        assert got[k].dtype == want[k].dtype
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=1e-2, rtol=1e-2)
    # the result is loadable as a checkpoint itself
    model_soup([out, dirs[1]], output=tmp_path / "soup2")


def test_pickled_weights_of_a_checkpoint_are_not_copied(tmp_path):
    dirs = [_model_dir(tmp_path / f"m{i}", i, 1) for i in range(2)]
    (dirs[0] / "pytorch_model.bin").write_bytes(b"not averaged")
    (dirs[0] / "training_args.bin").write_bytes(b"pickle")
    out = model_soup(dirs, output=tmp_path / "soup")
    assert not list(out.glob("*.bin")) and (out / "config.json").is_file()


def _corrupt(tmp_path, change):
    paths = _files(tmp_path, 2)
    t = _tensors(1)
    change(t)
    save_file(t, str(paths[1]))
    return paths


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("b.half"), r"tensor 'b.half' of .*ck0.safetensors is missing from .*ck1"),
    (lambda t: t.update(extra=torch.ones(1)), r"tensor 'extra' of .*ck1.safetensors is not in"),
    (lambda t: t.update({"a.weight": torch.ones(6, 4)}), r"tensor 'a.weight' has shape \[4, 6\] in .* but \[6, 4\]"),
    (lambda t: t.update({"c.bf16": torch.ones(3, 2)}), r"tensor 'c.bf16' has dtype BF16 in .* but F32"),
    (lambda t: t.update({"d.ids": torch.arange(7) + 1}), r"tensor 'd.ids' is an integer tensor that differs"),
    (lambda t: t["a.weight"].__setitem__((1, 2), float("nan")), r"tensor 'a.weight' of .*ck1.safetensors holds NaN or"),
    (lambda t: t["b.half"].__setitem__(0, float("inf")), r"tensor 'b.half' of .*ck1.safetensors holds NaN or inf"),
    (lambda t: t.update({f"language_model.{k}": t.pop(k) for k in list(t)}, vision_tower=torch.ones(2)),
     r"is missing from .*ck1.safetensors \(6 missing in all\); .*ck1.safetensors holds a multimodal model with its "
     r"text model under 'language_model.', .*ck0.safetensors the text model alone"),
])
def test_mismatch_errors_write_nothing(tmp_path, change, message):
    paths = _corrupt(tmp_path, change)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        model_soup(paths, output=tmp_path / "soup.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("weights, message", [
    ([1.0, -1.0], "must be finite and >= 0"), ([float("inf"), 1.0], "must be finite and >= 0"),
    ([0.0, 0.0], "must not all be zero"), ([1.0], "one entry per checkpoint"),
    (0.5, "weights must be a list of numbers, one per checkpoint"),
    (["a", "b"], "weights must be a list of numbers, one per checkpoint"),
])
def test_weight_errors(tmp_path, weights, message):
    paths = _files(tmp_path, 2)
    with pytest.raises(ValueError, match=message):
        model_soup(paths, weights=weights, output=tmp_path / "soup.safetensors")
    assert not (tmp_path / "soup.safetensors").exists()


def test_path_errors(tmp_path):
    paths = _files(tmp_path, 2)
    d = _model_dir(tmp_path / "m", 0, 1)
    with pytest.raises(ValueError, match="not a mix"):
        model_soup([paths[0], d], output=tmp_path / "x")
    with pytest.raises(ValueError, match="does not exist"):
        model_soup([paths[0], tmp_path / "nope"], output=tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="must be a .safetensors file path"):
        model_soup(paths, output=tmp_path / "x.bin")
    with pytest.raises(ValueError, match="non-empty list"):
        model_soup([], output=tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="output must be a directory path when the checkpoints are model directories"):
        model_soup([d, d], output=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        model_soup([d, d], output=tmp_path / "busy")
    with pytest.raises(ValueError, match="is one of the checkpoints"):
        model_soup(paths, output=paths[0])
    (tmp_path / "kept.safetensors").write_bytes(b"another model")
    with pytest.raises(ValueError, match="output file .*kept.safetensors already exists; choose a new path"):
        model_soup(paths, output=tmp_path / "kept.safetensors")
    assert (tmp_path / "kept.safetensors").read_bytes() == b"another model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="exactly one .safetensors"):
        model_soup([tmp_path / "empty"], output=tmp_path / "y")


def test_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Only about one tensor per checkpoint is alive at once while the soup is written."""
    import gc
    import weakref

    from kalm_fast.train import soup as soup_module
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"big{i}.safetensors")
        save_file({f"t{j}": torch.full((256, 256), float(i + j)) for j in range(6)}, str(paths[-1]))
    alive, peak = [], [0]
    real = soup_module._average

    def tracking(name, ckpts, weights, handles):
        out = real(name, ckpts, weights, handles)
        gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(out))
        peak[0] = max(peak[0], len(alive))
        return out

    monkeypatch.setattr(soup_module, "_average", tracking)
    out = model_soup(paths, output=tmp_path / "soup.safetensors")
    assert peak[0] <= 2  # the tensor being written and, at most, the one before it
    assert torch.equal(load_file(str(out))["t5"], torch.full((256, 256), 6.0))


def test_top_level_and_cli(tmp_path):
    from kalm_fast.cli import main

    assert kalm_fast.model_soup is model_soup
    paths = _files(tmp_path, 2)
    assert main(["soup", str(paths[0]), str(paths[1]), "--weights", "3", "1", "--output",
                 str(tmp_path / "s.safetensors")]) == 0
    got = load_file(str(tmp_path / "s.safetensors"))
    torch.testing.assert_close(got["a.weight"], _expected([3, 1])["a.weight"])


def test_non_finite_weights_in_a_directory_write_nothing(tmp_path):
    dirs = [_model_dir(tmp_path / f"m{i}", i, 2) for i in range(2)]
    shard = sorted(dirs[1].glob("*.safetensors"))[-1]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{name}' of .*m1 holds NaN or inf values"):
        model_soup(dirs, output=tmp_path / "soup")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1"]


def test_a_killed_soups_temp_files_are_removed_by_the_next(tmp_path):
    paths = _files(tmp_path, 2)
    (tmp_path / ".soup.safetensors.abc.tmp").write_bytes(b"half")
    (tmp_path / ".soup.xyz.tmp").mkdir()
    model_soup(paths, output=tmp_path / "soup.safetensors")
    assert not (tmp_path / ".soup.safetensors.abc.tmp").exists()
    dirs = [_model_dir(tmp_path / f"m{i}", i, 1) for i in range(2)]
    model_soup(dirs, output=tmp_path / "soup")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_are_averaged_in_fp32(tmp_path, dtype):
    """Rounded once, to the nearest value of the tensor's dtype: the sum is accumulated in fp32, not in the tensor's
    own precision (which drifts by many ulps over a few checkpoints)."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(2000, generator=g).to(dtype) for _ in range(5)]
    weights = torch.rand(5, generator=g).tolist()
    paths = []
    for i, t in enumerate(ts):
        paths.append(tmp_path / f"h{i}.safetensors")
        save_file({"w": t}, str(paths[-1]))
    got = load_file(str(model_soup(paths, weights=weights, output=tmp_path / "soup.safetensors")))["w"]
    assert got.dtype == dtype
    want = sum(w / sum(weights) * t.double() for w, t in zip(weights, ts))  # exact, in float64
    torch.testing.assert_close(got.double(), want, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_integer_and_bool_buffers_of_any_width_are_kept_not_averaged(tmp_path):
    """int32 / int16 / uint8 / bool buffers must agree across checkpoints and come out unchanged, exactly."""
    buffers = {"i32": torch.arange(7, dtype=torch.int32) * 3 + 1, "i16": torch.arange(5, dtype=torch.int16),
               "u8": torch.arange(4, dtype=torch.uint8) + 250, "mask": torch.tensor([True, False, True])}
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"b{i}.safetensors")
        save_file({"w": torch.full((2,), float(i)), **buffers}, str(paths[-1]))
    got = load_file(str(model_soup(paths, output=tmp_path / "soup.safetensors")))
    for name, t in buffers.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    torch.testing.assert_close(got["w"], torch.full((2,), 1.0))
    save_file({"w": torch.zeros(2), **dict(buffers, i32=buffers["i32"] + 1)}, str(paths[2]))
    with pytest.raises(ValueError, match="tensor 'i32' is an integer tensor that differs"):
        model_soup(paths, output=tmp_path / "soup2.safetensors")
