"""The raw ops (imi_softmax.ops, which torch.compile reaches without the Python checks) on corrupted
but well-typed inputs (tests/corrupt_op_cases.py): each case raises a Python exception where an error
is due and returns where the input is valid; under the ASan + UBSan build (make test-sanitize) none
may read or write out of bounds either way. Each case gets a fresh index."""
import pytest

from corrupt_op_cases import CASES, SETUP

ERRORS = (RuntimeError, ValueError, IndexError, TypeError)


@pytest.mark.parametrize("name", sorted(CASES))
def test_corrupt_op_input(name):
    expect, code = CASES[name]
    ns: dict = {}
    exec(SETUP, ns)
    if expect == "err":
        with pytest.raises(ERRORS):
            exec(code, ns)
    elif expect == "ok":
        exec(code, ns)
    else:  # a corrupt value the ops do not check: either outcome, as long as it stays in bounds
        try:
            exec(code, ns)
        except ERRORS:
            pass


def test_every_kind_of_case_is_present():
    kinds = {expect for expect, _ in CASES.values()}
    assert kinds == {"err", "ok", "?"} and sum(e == "err" for e, _ in CASES.values()) > 150
