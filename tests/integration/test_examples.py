"""examples/: methods written outside the package run through the real CLI like built-in ones."""

from __future__ import annotations

import pytest

from conftest import ROOT, run_main


@pytest.mark.parametrize("example, expected", [
    # BitFit on all-MiniLM-L6-v2: every bias (6 layers x (q,k,v,attn-out 384 + LN 384 + FFN-in 1536 + FFN-out 384
    # + LN 384) + embeddings LN 384 + pooler 384) plus the new head (384*2 + 2)
    ("bitfit", 6 * (4 * 384 + 384 + 1536 + 384 + 384) + 384 + 384 + 384 * 2 + 2),
])
def test_example_method_end_to_end(tmp_path, capsys, monkeypatch, example, expected):
    monkeypatch.chdir(ROOT)  # class_path examples.<name>.<Class> resolves from the working directory
    code, out, err = run_main(["fit", "--config", "configs/quickstart.yaml", "--config", f"examples/{example}.yaml",
                               "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                               "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
                               "--trainer.enable_progress_bar", "false",
                               "--trainer.logger.init_args.save_dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert f"trainable   {expected:,} / " in out
    run = tmp_path / "quickstart/version_0"
    assert (run / "adapter/best/adapter_model.safetensors").is_file()
    from peftlab.api import load_run

    result = load_run(str(run)).predict(["A warm, funny film."])
    assert result[0]["label"] in ("rotten", "fresh")
