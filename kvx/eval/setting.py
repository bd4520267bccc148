"""What an eval row was measured under, apart from its policy and budget: its setting.

Scores are comparable only within one setting (the same task, context length, haystack and mode), so the
pictures and the best-per-budget tables are drawn one setting at a time, never averaged across them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The order modes are shown in: the realistic cache reuse first, as docs/results.md opens with it.
MODE_ORDER = ("agnostic", "aware", "aware-plain")


@dataclass(frozen=True)
class Setting:
    mode: str
    task: str
    context: int
    haystack: str
    model: str = ""

    def title(self, with_model: bool = False) -> str:
        """'passkey · 4096 tokens · noise · agnostic' (and the model, when rows of several are shown)."""
        text = f"{self.task} · {self.context} tokens · {self.haystack} · {self.mode}"
        return f"{text} · {self.model}" if with_model and self.model else text


def setting_of(row: dict) -> Setting:
    # Rows written before a field existed lack it; they still group among themselves.
    return Setting(mode=str(row.get("mode", "?")), task=str(row.get("task", "?")),
                   context=int(row.get("context") or 0), haystack=str(row.get("haystack", "?")),
                   model=str(row.get("model") or ""))


def by_setting(rows: list[dict]) -> dict[Setting, list[dict]]:
    """The rows grouped by setting: modes in MODE_ORDER, otherwise in the order they first appear."""
    groups: dict[Setting, list[dict]] = {}
    for row in rows:
        groups.setdefault(setting_of(row), []).append(row)
    first = {s: i for i, s in enumerate(groups)}
    rank = {m: i for i, m in enumerate(MODE_ORDER)}
    ordered = sorted(groups, key=lambda s: (rank.get(s.mode, len(rank)), first[s]))
    return {s: groups[s] for s in ordered}


def several_models(settings) -> bool:
    return len({s.model for s in settings}) > 1
