"""Bad-input cases: model (see bad_input_env.py; run by test_bad_inputs.py)."""

from typing import Dict

from bad_input_env import Case

CASES: Dict[str, Case] = {}
