"""Every preset in configs/ is a valid plan at the world size it is written for."""

import pytest

import train

PRESETS = {"debug": 1, "llama3_2_1b": 8, "llama3_2_1b_32k": 8, "llama3_2_3b": 8, "llama3_1_8b": 8, "llama3_1_70b": 64, "llama3_1_70b_qlora": 2}
PARAMS = {"llama3_2_1b": "1,235,814,400", "llama3_2_3b": "3,212,749,824", "llama3_1_8b": "8,030,261,248", "llama3_1_70b": "70,553,706,496"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_plans(shared, capsys, name):
    shared("tokenizers/llama3/tokenizer.model")  # the presets name the shared Llama 3 tokenizer
    code = train.main(["--config", f"configs/{name}.yaml", "--dry-run", "--world-size", str(PRESETS[name])])
    out, err = capsys.readouterr()
    assert code == 0, err
    if name in PARAMS:
        assert f"parameters total: {PARAMS[name]}" in out  # Meta's published sizes


def test_70b_qlora_preset_fits_two_24gb_cards(shared, capsys):
    shared("tokenizers/llama3/tokenizer.model")
    code = train.main(["--config", "configs/llama3_1_70b_qlora.yaml", "--dry-run", "--world-size", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    device = float(next(line for line in out.splitlines() if line.startswith("total on the device")).split()[-2])
    host = float(next(line for line in out.splitlines() if line.startswith("total in host memory")).split()[-2])
    assert device < 22.0 and 15 < host < 25, out  # a 24 GB card holds 22.35 GiB
