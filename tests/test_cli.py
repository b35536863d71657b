import json

from hf_zero.cli import main


def test_check_config_resolves_and_reports(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}))
    assert main(["check-config", str(good), "--world-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["gradient_accumulation_steps"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stag": 1}}))
    assert main(["check-config", str(bad)]) == 2
    assert "zero_optimization.stag" in capsys.readouterr().err
