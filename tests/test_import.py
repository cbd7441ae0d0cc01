"""``import functorch_diary`` stays lean: torchvision (and the torch._dynamo, torch._inductor
and sympy it pulls in, seconds under load) load only when a feature needs them."""

import subprocess
import sys


def test_import_loads_neither_torchvision_nor_the_compiler():
    code = (
        "import sys, functorch_diary as fd\n"
        "heavy = [m for m in ('torchvision', 'torch._dynamo', 'torch._inductor', 'sympy')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
        "fd.models.lenet\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, zoo_loads_it = out.stdout.splitlines()
    assert loaded == "", f"import functorch_diary loaded {loaded}"
    assert zoo_loads_it == "True"  # and the zoo still works, on first use
