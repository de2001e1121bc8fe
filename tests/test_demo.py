"""The README's first command, `l2t-dist demo`, in its quick form: the whole path end to end."""

from l2t_dist.cli import main


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "method    val acc" in out and "scratch" in out and "l2t_ww" in out
    assert "learned λ per pair" in out and "src_a:" in out and "src_b:" in out
    for run in ("src_a", "src_b", "target-scratch", "target-l2t_ww"):
        assert (tmp_path / "demo" / run / "best.pt").exists()


def test_demo_refuses_a_used_folder(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("precious")
    assert main(["demo", "--out", str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "used" / "keep.txt").read_text() == "precious"
