"""MTEB 2: ``MTEBModel`` runs under ``mteb.evaluate`` on MTEB's in-memory mock tasks (no hub, no downloads) with the
prompts MTEB's own wrappers give a SentenceTransformer, and the same scores."""
import pytest

mteb = pytest.importorskip("mteb", reason="mteb is not installed (pip install kalm_fast[mteb])")

from mteb.mocks import MockClassificationTask, MockRetrievalTask, MockSTSTask  # noqa: E402
from mteb.models.instruct_wrapper import InstructSentenceTransformerModel  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from kalm_fast.encode import Encoder  # noqa: E402
from kalm_fast.models.loading import default_model_dir  # noqa: E402
from kalm_fast.mteb_model import MTEBModel  # noqa: E402
from kalm_fast.prompts import kalm_query_prompt  # noqa: E402

PROMPTS = {"query": "query: ", "document": "passage: ", "STS": "Same meaning? "}


def _tasks():
    return [MockRetrievalTask(), MockSTSTask(), MockClassificationTask()]


def _run(model):
    """Scores per task, and the prompt each encode call received (recorded on the wrapped model's ``encode``)."""
    calls = []
    encode = model.model.encode

    def recording(*args, prompt=None, **kwargs):
        calls.append(prompt)
        return encode(*args, prompt=prompt, **kwargs)

    model.model.encode = recording
    result = mteb.evaluate(model, _tasks(), cache=None, show_progress_bar=False)
    return {r.task_name: r.get_score() for r in result.task_results}, calls


@pytest.fixture(scope="module")
def encoder():
    return Encoder(device="cpu", prompts=PROMPTS)


def _st_prompted():
    return SentenceTransformer(str(default_model_dir()), device="cpu", prompts=PROMPTS)


def test_kalm_instructions_as_mteb_evaluates_kalm_embedding_v2(encoder):
    """Default: MTEB's own KaLM-Embedding-V2 evaluation (instruction wrapper, KaLM template, plain documents)."""
    instructions = {"MockRetrievalTask": "Given a question, retrieve passages that answer it"}
    ours = MTEBModel(encoder, instructions=instructions)
    assert ours.mteb_model_meta.embed_dim == 384 and ours.mteb_model_meta.max_tokens == 256
    got, our_prompts = _run(ours)
    ref = InstructSentenceTransformerModel(str(default_model_dir()), revision=None, device="cpu",
                                           instruction_template=kalm_query_prompt("{instruction}"),
                                           apply_instruction_to_passages=False, prompts_dict=instructions,
                                           prompts=PROMPTS)
    want, their_prompts = _run(ref)
    assert our_prompts == their_prompts
    assert kalm_query_prompt(instructions["MockRetrievalTask"]) in our_prompts and None in our_prompts
    assert got.keys() == want.keys() == {"MockRetrievalTask", "MockSTSTask", "MockClassificationTask"}
    for task in got:
        assert got[task] == pytest.approx(want[task], abs=1e-6), task


def test_model_prompts_per_task_and_type_as_mteb_sentence_transformer_wrapper(encoder):
    """``use_instructions=False``: the model's prompts by task name / prompt type, as MTEB gives a
    SentenceTransformer (its SentenceTransformerEncoderWrapper)."""
    from mteb.models import SentenceTransformerEncoderWrapper

    got, our_prompts = _run(MTEBModel(encoder, use_instructions=False))
    want, their_prompts = _run(SentenceTransformerEncoderWrapper(_st_prompted()))
    assert our_prompts == their_prompts
    assert {"query: ", "passage: ", "Same meaning? "} <= set(our_prompts)
    for task in got:
        assert got[task] == pytest.approx(want[task], abs=1e-6), task


def test_model_meta_and_bad_arguments(tmp_path):
    enc = Encoder(device="cpu", similarity_fn_name="dot", truncate_dim=128)
    model = MTEBModel(enc, name="me/minilm", revision="r1")
    meta = model.mteb_model_meta
    assert (meta.name, meta.revision, meta.embed_dim, meta.similarity_fn_name.value) == ("me/minilm", "r1", 128, "dot")
    with pytest.raises(ValueError, match="Encoder"):
        MTEBModel(enc, device="cpu")
    assert MTEBModel(None, device="cpu").mteb_model_meta.name == "kalm_fast/encoder"
