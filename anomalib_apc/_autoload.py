"""Makes anomalib's CLI know ``AnomalousPatchCore``, ``SupervisedMVTecAD`` and ``SupervisedFolder`` by short name.

anomalib's CLI (jsonargparse) resolves ``--model NAME`` among the subclasses of ``AnomalibModule``
that are already imported. The ``anomalib_apc_autoload.pth`` file installed with the package runs
this module at interpreter start-up. It only appends a meta-path finder: nothing is imported until a
program imports ``anomalib.cli.cli``, and right after that module has run, the plugin's models and
datamodules are imported. Programs that never import anomalib's CLI pay a few microseconds.

``anomalib benchmark --config`` (its grid pipeline) resolves a ``class_path`` differently: ``get_model``
and ``get_datamodule`` look the short name up as an attribute of the ``anomalib.models`` and
``anomalib.data`` modules, and ``get_model`` refuses any dotted path outside a whitelist of anomalib
modules, so that a config cannot make it import arbitrary code. At the same moment the hook therefore
sets :data:`SHORT_NAMES` (our public classes only) as attributes of those two modules, never replacing
a name anomalib has itself. The whitelist is left as it is: ``anomalib_apc.models.AnomalousPatchCore``
stays refused there, and nothing but these three classes becomes reachable.
"""

import importlib
import logging
import sys
from types import ModuleType

CLI_MODULE = "anomalib.cli.cli"
PLUGIN_MODULES = ("anomalib_apc.models", "anomalib_apc.data")
SHORT_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "anomalib.models": ("anomalib_apc.models", ("AnomalousPatchCore",)),
    "anomalib.data": ("anomalib_apc.data", ("SupervisedMVTecAD", "SupervisedFolder")),
}
"""anomalib module -> (plugin module, the public classes registered there under their own names)."""


def register_short_names() -> None:
    """Make anomalib's ``get_model``/``get_datamodule`` find :data:`SHORT_NAMES` by short name.

    A name anomalib already defines is left alone (with a warning): the plugin never shadows anomalib.
    """
    for target_name, (source_name, names) in SHORT_NAMES.items():
        target, source = importlib.import_module(target_name), importlib.import_module(source_name)
        for name in names:
            ours, present = getattr(source, name), getattr(target, name, None)
            if present is None:
                setattr(target, name, ours)
            elif present is not ours:
                logging.getLogger(__name__).warning(
                    "anomalib-apc: %s.%s exists already; %s.%s is not registered under that name.",
                    target_name, name, source_name, name,
                )


class _ImportPluginAfterLoader:
    """Runs the real loader of anomalib's CLI module, then imports the plugin modules."""

    def __init__(self, loader: object) -> None:
        self.loader = loader

    def create_module(self, spec: object) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        for name in PLUGIN_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # a broken plugin must not take anomalib's CLI down with it
                logging.getLogger(__name__).exception("anomalib-apc: could not import %s for anomalib's CLI.", name)
                return
        register_short_names()


class _AnomalibCliFinder:
    """Meta-path finder that only answers for anomalib's CLI module, wrapping its loader."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != CLI_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ImportPluginAfterLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Install the finder once per interpreter."""
    if not any(isinstance(finder, _AnomalibCliFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibCliFinder())


install()
