"""The one way ``patches/`` change open_clip: wrap or replace a binding once, and record it.

Every change goes through ``wrap`` / ``replace``, so "already applied" is one registry lookup
(keyed on owner, attribute and patch), ``applied()`` lists what is in place, and ``unapply()``
restores the originals in reverse order. ``overlay`` gives one module's namespace a copy of a
module with a few attributes replaced; ``for_each_main`` reaches ``open_clip_train.main``, which
under ``python -m`` exists only as ``__main__`` once it runs.
"""
import functools
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

MAIN = "open_clip_train.main"


@dataclass(frozen=True)
class Binding:
    """One attribute a patch changed: ``owner.attribute`` was ``original``, is ``replacement``."""

    patch: str
    owner: Any
    attribute: str
    original: Any
    replacement: Any

    @property
    def target(self) -> str:
        return f"{getattr(self.owner, '__name__', type(self.owner).__name__)}.{self.attribute}"


_records: Dict[Tuple[int, str, str], Binding] = {}
_main_hooks: Dict[str, Callable[[types.ModuleType], None]] = {}


def _bind(patch: str, owner: Any, attribute: str, original: Any, replacement: Any) -> None:
    setattr(owner, attribute, replacement)
    _records[(id(owner), attribute, patch)] = Binding(patch, owner, attribute, original, replacement)


def wrap(owner: Any, attribute: str, make_wrapper: Callable[[Any], Any], *, patch: str,
         also: Iterable[Any] = ()) -> Any:
    """Set ``owner.attribute`` to ``make_wrapper(original)`` unless ``patch`` already did; return it.

    Each owner in ``also`` holds an alias of the same name (``open_clip.create_model`` for
    ``open_clip.factory.create_model``): it is rebound too, where it holds what this wrapper wraps
    (the original or an earlier patch's wrapper), never where a later patch's wrapper is.
    """
    record = _records.get((id(owner), attribute, patch))
    if record is None:
        original = getattr(owner, attribute)
        _bind(patch, owner, attribute, original, make_wrapper(original))
        record = _records[(id(owner), attribute, patch)]
    below = _below(record)
    for alias in also:
        current = getattr(alias, attribute, None)
        if (id(alias), attribute, patch) not in _records and any(current is b for b in below):
            _bind(patch, alias, attribute, current, record.replacement)
    return record.replacement


def _below(record: Binding) -> List[Any]:
    """What ``record`` wraps, directly or through earlier patches of the same binding."""
    below = []
    for other in _records.values():
        if other.owner is record.owner and other.attribute == record.attribute:
            below.append(other.original)
        if other is record:
            break
    return below


def replace(owner: Any, attribute: str, value: Any, *, patch: str, also: Iterable[Any] = ()) -> Any:
    """Set ``owner.attribute`` to ``value`` unless ``patch`` already replaced it; return what is bound."""
    return wrap(owner, attribute, lambda _original: value, patch=patch, also=also)


def applied() -> List[Binding]:
    """Every binding in place, in the order it was made."""
    return list(_records.values())


def original_of(owner: Any, attribute: str, patch: str) -> Any:
    """What ``patch`` found at ``owner.attribute`` (and wrapped or replaced)."""
    return _records[(id(owner), attribute, patch)].original


def chain(owner: Any, attribute: str) -> List[str]:
    """The patches wrapping ``owner.attribute``, innermost (applied first) first."""
    return [r.patch for r in _records.values() if r.owner is owner and r.attribute == attribute]


def describe() -> Iterator[str]:
    """One line per binding: the patch and what it changes (``python -m conlip_plugin patches``)."""
    for record in _records.values():
        yield f"{record.patch}: {record.target}"
    for patch in _main_hooks:
        yield f"{patch}: names in {MAIN}, once it runs"


def unapply(patches: Optional[Iterable[str]] = None) -> None:
    """Restore the originals of ``patches`` (default: all) in reverse order; a later ``apply()``
    starts afresh."""
    names = None if patches is None else set(patches)
    for key, record in reversed(list(_records.items())):
        if names is None or record.patch in names:
            setattr(record.owner, record.attribute, record.original)
            del _records[key]
    for patch in list(_main_hooks):
        if names is None or patch in names:
            del _main_hooks[patch]


class _Overlay(types.ModuleType):
    """A module whose attributes are the real module's, looked up at each use, except a few."""

    def __init__(self, module: types.ModuleType, replaced: Mapping[str, Any]) -> None:
        super().__init__(module.__name__, module.__doc__)
        self.__dict__["_module"] = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)


def overlay(module: types.ModuleType, replaced: Mapping[str, Any]) -> types.ModuleType:
    """``module`` with the attributes in ``replaced`` (dotted names reach submodules) swapped."""
    own: Dict[str, Any] = {}
    nested: Dict[str, Dict[str, Any]] = {}
    for name, value in replaced.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            own[head] = value
    for head, inner in nested.items():
        own[head] = overlay(getattr(module, head), inner)
    return _Overlay(module, own)


def mains() -> Iterator[types.ModuleType]:
    """``open_clip_train.main`` as imported, and as ``__main__`` under ``python -m``."""
    imported = sys.modules.get(MAIN)
    if imported is not None:
        yield imported
    entry = sys.modules.get("__main__")
    if entry is not None and entry is not imported and getattr(getattr(entry, "__spec__", None), "name", None) == MAIN:
        yield entry


def patch_mains() -> None:
    """Run every ``for_each_main`` hook on every ``open_clip_train.main`` there is now."""
    for main in mains():
        for hook in list(_main_hooks.values()):
            hook(main)


def for_each_main(patch: str, hook: Callable[[types.ModuleType], None]) -> None:
    """Call ``hook(main)`` for every ``open_clip_train.main`` now, and again when its
    ``parse_args`` runs (by then ``python -m open_clip_train.main`` has made ``__main__``).
    ``hook`` should change ``main`` through ``wrap`` / ``replace`` so repeated calls are no-ops."""
    import open_clip_train.params as params

    _main_hooks[patch] = hook

    def hooked(parse_args: Callable) -> Callable:
        @functools.wraps(parse_args)
        def parse_args_then_patch_main(*args: Any, **kwargs: Any) -> Any:
            patch_mains()
            return parse_args(*args, **kwargs)

        return parse_args_then_patch_main

    wrap(params, "parse_args", hooked, patch="for_each_main")
    patch_mains()
