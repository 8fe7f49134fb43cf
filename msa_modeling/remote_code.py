"""The modeling code written beside a checkpoint, so that `trust_remote_code=True` loads it
where torch and transformers are installed but `msa_modeling` is not.

Hugging Face's remote-code loader copies the file an `auto_map` entry names and, recursively,
the files its single-level relative imports (`from .x import y`) name, all into one flat
folder. `msa_modeling` has subpackages (`backbones/`, `inference/`), so the package is written
flattened: `backbones/base.py` becomes `backbones_base.py`, `backbones/__init__.py` becomes
`backbones.py`, and every relative import is rewritten to the flat name. Flattening a flat
folder changes nothing, so a model loaded from remote code saves the same files again.
"""

from __future__ import annotations

import re
from pathlib import Path

# `config.json`'s `auto_map`: the class of each Auto factory, as `<flat module>.<class>`.
AUTO_MAP = {
    "AutoConfig": "configuration_msa.MSAConfig",
    "AutoModel": "modeling_msa.MSAModel",
    "AutoModelForCausalLM": "modeling_msa.MSAForCausalLM",
}

_RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+)([\w.]*)(\s+import\b)", re.MULTILINE)


def _module_parts(path: Path, root: Path) -> tuple[str, ...]:
    """Dotted name parts of a source file below `root` (a package's `__init__` is the package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def _flatten_imports(source: str, package: tuple[str, ...], where: Path) -> str:
    """`source` with each relative import pointing at its flat module name."""

    def flat(match: re.Match) -> str:
        leading, dots, name, keyword = match.groups()
        if not name:
            raise ValueError(f"{where}: 'from {dots} import ...' cannot be flattened; import the module by name")
        base = package[: len(package) - (len(dots) - 1)]
        return f"{leading}.{'_'.join(base + tuple(name.split('.')))}{keyword}"

    return _RELATIVE_IMPORT.sub(flat, source)


def flattened_sources(root: Path) -> dict[str, str]:
    """{flat file name: source} for every module of the package at `root`, its `__init__` excepted
    (importing the package registers the Auto classes; remote code goes through `auto_map`)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = _module_parts(path, root)
        if not parts:
            continue
        package = parts if path.name == "__init__.py" else parts[:-1]
        files["_".join(parts) + ".py"] = _flatten_imports(path.read_text(), package, path)
    return files


def write_remote_code(save_directory: str | Path) -> None:
    """Write this package's modeling files, flattened, into `save_directory`."""
    for name, source in flattened_sources(Path(__file__).parent).items():
        (Path(save_directory) / name).write_text(source)
