"""qbench's own model cards, registered through `qbench_register_models` like a plugin's.

The cards are the JSON files of the repository's `models/` folder, which a wheel packages as
`qbench/registry_files` (pyproject's force-include). This module is one of the plugin
manager's `BUILTIN_HOOK_MODULES`, so a distribution that registers cards goes through exactly
the same hook, checks and conflict rules as these (a name both offer keeps qbench's card).
"""

from __future__ import annotations

from pathlib import Path

from qbench.checkpoints.card import ModelCard
from qbench.hookspecs import hookimpl


def registry_dirs() -> list[Path]:
    """Where the built-in cards are: beside the code in a wheel, `models/` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    return [d for d in (package / "registry_files", package.parent / "models") if d.is_dir()]


def builtin_model_cards() -> list[ModelCard]:
    """Every built-in card, one per name (a wheel's packaged copy wins over a checkout's)."""
    cards: dict[str, ModelCard] = {}
    for directory in registry_dirs():
        for path in sorted(directory.glob("*.json")):
            try:
                card = ModelCard.model_validate_json(path.read_text(encoding="utf-8"))
            except ValueError as exc:  # pydantic's ValidationError: say which file
                raise ValueError(f"{path}: {' '.join(str(exc).split())}") from None
            cards.setdefault(card.name, card)
    return list(cards.values())


@hookimpl
def qbench_register_models() -> list[ModelCard]:
    return builtin_model_cards()
