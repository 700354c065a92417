"""``MTEBModel``: an ``Encoder`` as a model of MTEB 2 (``mteb.evaluate``), needs ``pip install kalm_fast[mteb]``.

By default texts are embedded as MTEB itself evaluates KaLM-Embedding-V2 (its ``InstructSentenceTransformerModel``
with the KaLM template and no instruction on documents): every input that is not a document gets the task's
instruction in the KaLM format ``Instruct: {instruction} \\n Query: {text}``, the instruction being
``instructions[task name or task type]`` if given, else the task's own prompt from MTEB. With
``use_instructions=False`` the model's own prompts are used as MTEB's sentence-transformers wrapper uses them: a
prompt named ``"{task}-{query|document}"``, ``"{task}"``, ``"{task type}-..."``, ``"{task type}"``, then
``"query"`` / ``"document"``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ScoringFunction
from mteb.types import PromptType

from .encode import Encoder
from .prompts import kalm_query_prompt


class MTEBModel(AbsEncoder):
    """``MTEBModel(path_or_encoder, revision=None, *, device=None, instructions=None, use_instructions=True,
    name=None, **encoder_kwargs)``: MTEB's encoder protocol (``encode``, ``similarity``, ``similarity_pairwise``,
    ``mteb_model_meta``) on an ``Encoder`` (given, or loaded from a local directory with ``Encoder``'s arguments).
    ``name`` ("organization/model") and ``revision`` label the results."""

    instruction_template = kalm_query_prompt("{instruction}")

    def __init__(self, model=None, revision: Optional[str] = None, *, device=None, instructions: Optional[dict] = None,
                 use_instructions: bool = True, name: Optional[str] = None, **encoder_kwargs):
        if isinstance(model, Encoder):
            if device is not None or encoder_kwargs:
                raise ValueError("device and Encoder arguments apply when MTEBModel loads the model; an Encoder "
                                 "was given")
            self.model = model
        else:
            self.model = Encoder(model, device=device, **encoder_kwargs)
        self.use_instructions = use_instructions
        self.prompts_dict = instructions
        self.model_prompts, _ = self.validate_task_to_prompt_name(self.model.prompts, raise_for_invalid_keys=False)
        if name is None:
            name = f"kalm_fast/{Path(model).name}" if isinstance(model, (str, Path)) else "kalm_fast/encoder"
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name, revision=revision, loader=MTEBModel, max_tokens=self.model.max_length,
            embed_dim=self.model.get_embedding_dimension(), framework=["PyTorch"], use_instructions=use_instructions,
            similarity_fn_name=ScoringFunction(self.model.similarity_fn_name)))

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: Optional[PromptType] = None, **kwargs):
        """``[N, dim]`` float32 embeddings of the texts of MTEB's data loader ``inputs`` (``kwargs``: ``Encoder.encode``
        arguments, MTEB's ``encode_kwargs``)."""
        features = getattr(inputs.dataset, "features", {})
        if any(k in features for k in ("image", "audio", "video")):
            raise ValueError(f"task {task_metadata.name} has {sorted(set(features) - {'text'})} inputs; kalm_fast "
                             "embeds text only")
        texts = [text for batch in inputs for text in batch["text"]]
        if self.use_instructions:
            prompt = None if prompt_type == PromptType.document else self.get_task_instruction(task_metadata,
                                                                                               prompt_type)
            return self.model.encode(texts, prompt=prompt, **kwargs)
        name = get_prompt_name(self.model_prompts, task_metadata, prompt_type) if self.model_prompts else None
        prompt = self.model_prompts[name] if name else None
        encode = {PromptType.query: self.model.encode_query,
                  PromptType.document: self.model.encode_document}.get(prompt_type, self.model.encode)
        return encode(texts, prompt=prompt, **kwargs)

    def similarity(self, embeddings1, embeddings2):
        return self.model.similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return self.model.similarity_pairwise(embeddings1, embeddings2)
