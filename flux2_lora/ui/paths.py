"""The folders the web app may touch. Every path typed or picked in the browser is resolved here first."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import BUILTIN_DATASETS
from ..data.folder import IMAGE_EXTENSIONS

# Values that name built-in data rather than a folder: the generated datasets, then the tiny models.
DATASETS = BUILTIN_DATASETS
BUILTINS = (*DATASETS, "builtin:tiny-dev", "builtin:tiny-klein")


class UiError(Exception):
    """A mistake in what the user asked for in the browser: shown as one line, nothing runs."""


@dataclass(frozen=True)
class Roots:
    """Allowed folders (resolved). Relative paths are taken inside the first one."""

    folders: tuple[Path, ...]

    @classmethod
    def of(cls, folders: Iterable[str | os.PathLike[str]]) -> Roots:
        resolved = []
        for f in folders:
            p = Path(f).expanduser().resolve()
            if not p.is_dir():
                raise UiError(f"--root: {f} is not a folder")
            resolved.append(p)
        if not resolved:
            raise UiError("--root: give at least one folder the app may use")
        return cls(tuple(resolved))

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.folders)

    def resolve(self, text: str | None, field: str, *, must_exist: bool = True, allow_builtin: bool = False) -> str:
        """The absolute path for `text`, which must lie inside an allowed folder (after following links)."""
        value = (text or "").strip()
        if not value:
            raise UiError(f"{field}: required")
        if allow_builtin and value in BUILTINS:
            return value
        if value.startswith("builtin:"):
            raise UiError(f"{field}: {value} is not a built-in name here ({', '.join(BUILTINS)})")
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = self.folders[0] / p
        p = p.resolve()  # links followed: a link inside a root that points outside is outside
        if not any(p == root or p.is_relative_to(root) for root in self.folders):
            raise UiError(
                f"{field}: {value} is outside the folders this app may use ({self.describe()}); "
                "restart `flux2-lora ui --root DIR` to allow another folder"
            )
        if must_exist and not p.exists():
            raise UiError(f"{field}: {p} does not exist")
        return str(p)

    def dataset(self, text: str | None, field: str = "dataset") -> tuple[Path, bool]:
        """(folder, built in) for a dataset picked in the page: a folder inside the roots, or a generated dataset
        (`builtin:sample`, `builtin:edit`: made once, read from the package's cache folder)."""
        value = (text or "").strip()
        if value in DATASETS:
            from ..data.sample import resolve_dataset

            return resolve_dataset(value), True
        if value.startswith("builtin:"):
            raise UiError(f"{field}: {value} is not a built-in dataset ({', '.join(DATASETS)})")
        return Path(self.resolve(value, field)), False

    def folders_with(self, predicate: str, depth: int = 3, limit: int = 200) -> list[str]:
        """Folders under the roots (depth-limited, hidden ones skipped) that hold images (`images`) or a training
        run (`run`: a metrics.jsonl) or a sweep (`sweep`: a trial_recipe.yaml); for the pickers."""
        found: list[str] = []
        for root in self.folders:
            for folder, dirs, files in os.walk(root):
                here = Path(folder)
                level = len(here.relative_to(root).parts)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("cache", "checkpoints"))
                if level >= depth:
                    dirs[:] = []
                hit = (
                    any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files)
                    if predicate == "images"
                    else ("metrics.jsonl" in files and "recipe.yaml" in files)
                    if predicate == "run"
                    else "trial_recipe.yaml" in files
                )
                if hit:
                    found.append(str(here))
                    if predicate == "images":
                        dirs[:] = []
                if len(found) >= limit:
                    return found
        return found
