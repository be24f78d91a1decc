"""What the decoupled methods (``zegformer``, ``deop``) share about their bound ``proposals``
input: reading its ``proposals.json`` and refusing one trained on other seen classes.

Used by the jobs only (``stages.jobs.methods.zegformer`` / ``deop``, ``stages.jobs.train_generator``,
``extract_features``): imports the proposal model's module (torch) at the top.
"""

from __future__ import annotations

from typing import Any

from zeroseg.errors import DataError
from zeroseg.models.maskformer import PROPOSALS_JSON, read_proposals_json


def bound_proposals(artifact: Any) -> tuple[dict[str, Any], str]:
    """The bound pretrain_proposals artifact's ``proposals.json`` and its name for messages.

    Returns:
        ``(doc, where)``: the parsed document and ``"proposals artifact <stage>/<key[:12]>"``.

    Raises:
        MissingFileError: the artifact has no ``proposals.json`` (naming the files it has).
        DataError: unreadable, not JSON, or lacking a key (``zeroseg.models.maskformer.read_proposals_json``).
    """
    where = f"proposals artifact {artifact.stage}/{artifact.key[:12]}"
    return read_proposals_json(artifact.file(PROPOSALS_JSON).parent), where


def check_seen(doc: dict[str, Any], train_seen: list[int] | tuple[int, ...], where: str) -> None:
    """Refuse proposals trained on other seen classes than this config's ``classes.json``
    ``train.seen``: a proposal model that saw unseen classes' masks breaks the zero-shot protocol,
    and the seen training ids of the two stages would disagree.

    Args:
        doc: the artifact's ``proposals.json`` (``seen``: the training class ids it was trained on).
        train_seen: ``classes.json`` ``train.seen`` of this config's build_splits.
        where: the artifact, for messages.

    Raises:
        DataError: the two lists differ (both named).
    """
    got = [int(s) for s in doc.get("seen") or []]
    if got != [int(s) for s in train_seen]:
        raise DataError(
            f"{where} was trained on seen classes {got} but this config's seen training classes are "
            f"{list(train_seen)} (classes.json); bind a pretrain_proposals of the same build_splits"
        )


__all__ = ["bound_proposals", "check_seen"]
