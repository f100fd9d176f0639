"""Property-based fuzzing of `dotted.key=value` overrides over the whole schema: whatever a user types,
parsing, validation and planning (everything that runs before any work) either accept it or raise one
of our user errors, never anything else. Seeded, so CI sees the same 500 examples every run."""

import dataclasses
import string

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.helpers import REPO
from trainer.config import load_config
from trainer.config.schema import CHOICES, Config
from trainer.errors import UserError
from trainer.plan import make_plan


def _fields(schema=Config, prefix="") -> dict[str, object]:
    """dotted key -> its annotated type, over the whole schema."""
    found = {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type):
            found.update(_fields(f.type, f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = f.type
    return found


FIELDS = _fields()
KEYS = sorted(FIELDS)
WORDS = sorted({w for choices in CHOICES.values() for w in choices})
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 1e-300, 1e300, 0.5]),
)
SPECIAL = st.sampled_from(["nan", "inf", "-inf", "NaN", "null", "None", "true", "false", "[]", "[q,k]", "{}",
                           "${job.name}", "${nope}", "", "'quoted'", "1e5", "0x10", "1_000", "~", "/", "/nope/x", "a\x00b", "configs"])
TEXT = st.one_of(st.text(alphabet=string.printable, max_size=24), st.text(max_size=12))
VALUES = st.one_of(NUMBERS.map(str), SPECIAL, st.sampled_from(WORDS), TEXT)
KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + "x"), TEXT)


def _typed(key: str):
    """Values of the key's own type, edge cases included: most examples get past parsing this way."""
    kind = str(FIELDS[key])
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if "bool" in kind:
        return st.sampled_from(["true", "false"])
    if "int" in kind:
        return st.one_of(st.integers(-3, 70), st.sampled_from([0, -1, 2**31, 2**63, 2**70])).map(str)
    if "float" in kind:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(1e-6, 10.0)).map(str)
    if "list" in kind:
        return st.sampled_from(["[q,k]", "[]", "[output]", "[nope]"])
    return st.one_of(TEXT, st.sampled_from(["null", "/nope/x", "hub:x/y", "a\x00b"]))


TYPED = st.sampled_from(KEYS).flatmap(lambda k: _typed(k).map(lambda v: f"{k}={v}"))
ANY = st.tuples(KEY, VALUES).map(lambda kv: f"{kv[0]}={kv[1]}")
OVERRIDES = st.lists(st.one_of(TYPED, TYPED, TYPED, ANY), min_size=1, max_size=3)


@seed(20261202)
@settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(overrides=OVERRIDES, world_size=st.sampled_from([1, 2, 8]))
def _fuzz_one(outcomes: dict, overrides, world_size):
    """One example: accepted and planned consistently, or refused with one of our one-line user errors."""
    try:
        cfg = load_config(REPO / "configs" / "debug.yaml", overrides)
        outcomes["parsed"] += 1
        plan = make_plan(cfg, world_size)
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message.strip() and "Traceback" not in message, (overrides, message)
        return
    outcomes["planned"] += 1
    d = plan.dims
    assert d.pp * d.dp_replicate * d.dp_shard * d.cp * d.tp == world_size, overrides
    assert plan.accum_steps >= 1 and plan.pp_microbatches >= 1 and plan.num_stages <= plan.model_args.n_layers
    assert plan.model_args.vocab_size >= plan.tokenizer.vocab_size
    assert plan.meta.tok_embeddings.weight.is_meta  # planning allocates nothing


def test_overrides_raise_only_user_errors_and_reach_planning():
    """500 seeded examples; enough of them get past parsing into planning, and some through it."""
    outcomes = {"parsed": 0, "planned": 0}
    _fuzz_one(outcomes)
    print(f"config fuzz: {outcomes}")
    assert outcomes["parsed"] >= 100 and outcomes["planned"] >= 20, outcomes
