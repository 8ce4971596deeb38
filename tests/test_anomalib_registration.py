"""anomalib's ``get_model``/``get_datamodule`` (its benchmark pipeline) find the plugin's classes by short name.

Run in a fresh process: the names are registered when a program imports ``anomalib.cli.cli``, as
``anomalib benchmark`` does, through the hook that ``anomalib_apc_autoload.pth`` installs.
"""

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json
    import anomalib.models, anomalib.data
    before = [hasattr(anomalib.models, "AnomalousPatchCore"), hasattr(anomalib.data, "SupervisedMVTecAD")]
    import anomalib.cli.cli
    from anomalib.data import get_datamodule
    from anomalib.models import UnknownModelError, get_model
    from anomalib_apc.data import SupervisedFolder, SupervisedMVTecAD
    from anomalib_apc.models import AnomalousPatchCore

    model = get_model({"class_path": "AnomalousPatchCore", "init_args": {"backbone": "resnet18", "pre_trained": False}})
    assert type(model) is AnomalousPatchCore and model.hparams.backbone == "resnet18", model
    data = get_datamodule({"class_path": "SupervisedMVTecAD", "init_args": {"root": "x", "category": "c"}})
    assert type(data) is SupervisedMVTecAD and data.category == "c", data
    assert anomalib.data.SupervisedFolder is SupervisedFolder
    assert type(get_model({"class_path": "Patchcore", "init_args": {"pre_trained": False}})).__name__ == "Patchcore"
    refused = []
    for path in ("anomalib_apc.models.AnomalousPatchCore", "anomalib_apc.models.apc.AnomalousPatchCore",
                 "os.path.join"):
        try:
            get_model({"class_path": path})
        except UnknownModelError:
            refused.append(path)
    print(json.dumps({"before": before, "refused": refused}))
""")


@pytest.mark.integration
def test_short_names_resolve_through_anomalib_and_its_whitelist_still_refuses_other_modules() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["before"] == [False, False]  # nothing is registered before anomalib's CLI is imported
    assert outcome["refused"] == [  # every dotted path outside anomalib's whitelist stays refused
        "anomalib_apc.models.AnomalousPatchCore", "anomalib_apc.models.apc.AnomalousPatchCore", "os.path.join",
    ]
