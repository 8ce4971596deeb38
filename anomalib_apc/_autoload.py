"""Makes anomalib's CLI know ``AnomalousPatchCore``, ``SupervisedMVTecAD`` and ``SupervisedFolder`` by short name.

anomalib's CLI (jsonargparse) resolves ``--model NAME`` among the subclasses of ``AnomalibModule``
that are already imported. The ``anomalib_apc_autoload.pth`` file installed with the package runs
this module at interpreter start-up. It only appends a meta-path finder: nothing is imported until a
program imports ``anomalib.cli.cli``, and right after that module has run, the plugin's models and
datamodules are imported. Programs that never import anomalib's CLI pay a few microseconds.
"""

import importlib
import logging
import sys
from types import ModuleType

CLI_MODULE = "anomalib.cli.cli"
PLUGIN_MODULES = ("anomalib_apc.models", "anomalib_apc.data")


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
