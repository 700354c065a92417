"""The KaLM-Embedding-V2 query format and the document format (title and text), used by ``Encoder``, evaluation
and the training data alike."""
from __future__ import annotations

from typing import Optional


def kalm_query_prompt(instruction: str) -> str:
    """The prefix of a query: ``"Instruct: {instruction} \\n Query: "``."""
    return f"Instruct: {instruction} \n Query: "


def format_query(query: str, instruction: Optional[str]) -> str:
    """``Instruct: {instruction} \\n Query: {query}``; the query alone without an instruction."""
    return kalm_query_prompt(instruction) + query if instruction else query


def join_title(title: Optional[str], text: str) -> str:
    """A document with a title: ``"{title} {text}"`` (as BEIR and MTEB join them); the text alone without one."""
    return f"{title} {text}".strip() if title else text
