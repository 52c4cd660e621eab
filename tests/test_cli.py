import json

from podar.cli import main


def test_graph_prints_mermaid(capsys):
    assert main(["graph"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stateDiagram-v2") and "idle --> computing_importance: start" in out


def test_schema_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "method" in schema["properties"]


def test_run_status_audit(config_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", str(config_file), "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Complete" in out and "perplexity" in out and "export:" in out
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "✅ Computing Importance" in out and "✅ Complete" in out
    assert "⚪ Calibrating" in out and "skipped" in out
    assert main(["audit", str(run_dir)]) == 0
    assert "audit OK" in capsys.readouterr().out
    # tamper with one record: the audit names it and exits non-zero
    audit = run_dir / "audit.jsonl"
    lines = audit.read_text().splitlines()
    lines[2] = lines[2].replace("pruned", "pruneD")
    audit.write_text("\n".join(lines) + "\n")
    assert main(["audit", str(run_dir)]) == 4  # EXIT["audit_failed"]
    assert "line 3" in capsys.readouterr().err


def test_status_shows_current_stage(tiny_config, tmp_path, capsys):
    from podar import Pipeline

    p = Pipeline(tiny_config, run_dir=tmp_path / "r", progress=False)
    p.step()
    p.step()
    p._release()
    assert main(["status", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "🟢 Pruning" in out and "✅ Computing Importance" in out and "⚪ Exporting" in out


def test_bad_config_exits_3_with_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_sparsity: 2\n")
    assert main(["run", str(bad), "--run-dir", str(tmp_path / "r")]) == 3
    assert "target_sparsity" in capsys.readouterr().err


def test_status_of_non_run_folder(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 3
    assert "not a podar run folder" in capsys.readouterr().err


def test_interrupted_run_resumes_from_the_cli(config_file, tmp_path, capsys, monkeypatch):
    from podar.engine import faults

    run_dir = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "interrupt@after:pruning#1")
    faults.reset()
    assert main(["run", str(config_file), "--run-dir", str(run_dir), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.delenv(faults.ENV)
    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    assert "Complete" in capsys.readouterr().out
    assert main(["audit", str(run_dir)]) == 0
