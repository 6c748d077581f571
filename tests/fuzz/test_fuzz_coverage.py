"""Every public op (leanformer.ops.__all__) has a fuzz test in this package."""
import importlib
import pathlib

import leanformer.ops
from tests.fuzz.fuzzing import FUZZED


def test_every_public_op_is_fuzzed():
    for path in sorted(pathlib.Path(__file__).parent.glob("test_fuzz_*.py")):
        importlib.import_module(f"tests.fuzz.{path.stem}")
    missing = sorted(set(leanformer.ops.__all__) - FUZZED)
    assert not missing, f"public ops without a @fuzz test in tests/fuzz: {missing}"
    unknown = sorted(FUZZED - set(leanformer.ops.__all__))
    assert not unknown, f"@fuzz names that are not in leanformer.ops.__all__: {unknown}"
