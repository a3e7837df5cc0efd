"""The cores a process may use (affinity, cgroup v1 / v2 quota) and the thread rule built on them (issue 19)."""

from __future__ import annotations

import os

import pytest

from glad_runtime.core import cpus


def _v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def _v1(tmp_path, quota, period):
    d = tmp_path / "cpu"
    d.mkdir()
    (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    (tmp_path / "a").mkdir()
    assert cpus.cgroup_cpu_limit(_v2(tmp_path / "a", "150000 100000\n")) == pytest.approx(1.5)
    (tmp_path / "b").mkdir()
    assert cpus.cgroup_cpu_limit(_v2(tmp_path / "b", "max 100000\n")) is None
    (tmp_path / "c").mkdir()
    assert cpus.cgroup_cpu_limit(_v1(tmp_path / "c", 50000, 100000)) == pytest.approx(0.5)
    (tmp_path / "d").mkdir()
    assert cpus.cgroup_cpu_limit(_v1(tmp_path / "d", -1, 100000)) is None
    assert cpus.cgroup_cpu_limit(tmp_path / "missing") is None
    assert cpus.cgroup_cpu_limit(tmp_path / "a", tmp_path / "no-proc-file") == pytest.approx(1.5)


def test_usable_cores_is_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.delenv("GLAD_CPU_CORES", raising=False)
    affinity = len(os.sched_getaffinity(0))
    assert cpus.affinity_cores() == affinity
    assert cpus.usable_cores(tmp_path / "none") == affinity
    (tmp_path / "q").mkdir()
    assert cpus.usable_cores(_v2(tmp_path / "q", "150000 100000")) == 1  # 1.5 cores: rounded down
    (tmp_path / "big").mkdir()
    assert cpus.usable_cores(_v2(tmp_path / "big", f"{100000 * (affinity + 8)} 100000")) == affinity
    (tmp_path / "tiny").mkdir()
    assert cpus.usable_cores(_v2(tmp_path / "tiny", "10000 100000")) == 1  # never 0
    monkeypatch.setenv("GLAD_CPU_CORES", "3")
    assert cpus.usable_cores(tmp_path / "none") == 3


def test_threads_for_divides_the_cores_among_instances(monkeypatch):
    monkeypatch.setenv("GLAD_CPU_CORES", "8")
    assert cpus.threads_for() == 8 and cpus.threads_for(2) == 4 and cpus.threads_for(3) == 2
    assert cpus.threads_for(16) == 1 and cpus.threads_for(4, requested=6) == 6
    with pytest.raises(ValueError):
        cpus.threads_for(0)
    with pytest.raises(ValueError):
        cpus.threads_for(1, requested=-1)


def test_ort_sessions_use_the_rule_and_do_not_spin(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from glad_runtime.engines.ort import session_options

    monkeypatch.setenv("GLAD_CPU_CORES", "3")
    opts = session_options()
    assert opts.intra_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    opts = session_options(2, spinning=True)
    assert opts.intra_op_num_threads == 2 and opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert isinstance(opts, ort.SessionOptions)


def test_quota_of_the_own_cgroup_and_its_ancestors(tmp_path):
    """A systemd slice or a container sharing the host's cgroup namespace: the quota sits in the process's own
    cgroup (from /proc/self/cgroup) or a parent, not at the root; the tightest one counts."""
    root = tmp_path / "cg"
    (root / "system.slice" / "line.service").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "system.slice" / "cpu.max").write_text("300000 100000\n")
    (root / "system.slice" / "line.service" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/line.service\n")
    assert cpus.cgroup_cpu_limit(root, proc) == pytest.approx(3.0)
    (root / "system.slice" / "line.service" / "cpu.max").write_text("50000 100000\n")
    assert cpus.cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    v1 = tmp_path / "v1"
    (v1 / "cpu" / "docker" / "abc").mkdir(parents=True)
    (v1 / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpus.cgroup_cpu_limit(v1, proc) == pytest.approx(2.0)
    assert cpus.cgroup_cpu_limit(v1, tmp_path / "no-such-file") is None
