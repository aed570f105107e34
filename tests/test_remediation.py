"""Remediation's pure parts: the action of every check and XID, where it travels, the
config, and the decisions (modes, cooldown, exclusions, one action per host, K running, the
circuit breaker, idempotence). With a real Slurm: tests/test_remediation_slurm.py."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from collector.alerts.model import Transition
from collector.health.actions import ACTIONS, CHECK_ACTIONS, action_for, xid_action
from collector.health.model import Observation, labels_key
from collector.notify.nats import transition_message
from collector.remediation import engine
from collector.remediation.config import remediation_config_from, render
from collector.remediation.engine import AlertView, RemediationState, StepResult, action_id, plan
from collector.remediation.executors import parse_node
from shared import xid
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_every_check_id_in_the_code_and_the_docs_has_an_action() -> None:
    ids: set[str] = set()
    for f in [*(ROOT / "collector" / "health").glob("*.py"), *(ROOT / "collector").glob("selfcheck*.py")]:
        ids |= set(re.findall(r'"((?:gpu|host|net|collector)\.[a-z_0-9]+)"', f.read_text()))
    doc = (ROOT / "docs" / "health.md").read_text()
    ids |= set(re.findall(r"^\| `((?:gpu|host|net)\.[a-z_0-9]+)`", doc, re.M))
    missing = sorted(i for i in ids if i not in CHECK_ACTIONS)
    assert missing == [], f"add these check ids to collector/health/actions.py CHECK_ACTIONS: {missing}"
    assert set(CHECK_ACTIONS.values()) <= set(ACTIONS)


def test_every_xid_of_the_catalogue_has_an_action_and_fatal_ones_drain() -> None:
    for code, info in xid.catalog().items():
        a = xid_action(code)
        assert a in ACTIONS
        if info.fatal and info.action in ("reset_gpu", "reboot"):
            assert a.startswith("drain_"), (code, a)
    assert xid_action(79) == "drain_and_reboot"
    assert xid_action(48) == "drain_and_reset_gpu"
    assert xid_action(13) == "restart_job"
    assert xid_action(54) == "check_power"
    assert xid_action(43) == "none"
    assert xid_action(99999) == "hardware_inspection"  # not in the catalogue


def test_observation_alert_and_nats_message_carry_the_action() -> None:
    labels = {"provider": "p", "host": "h", "gpu": "0", "xid": "79"}
    o = Observation("gpu.xid", "critical", labels, labels_key("gpu.xid", labels), 1.0)
    assert o.action == "drain_and_reboot"
    healthy = Observation("gpu.xid", "healthy", labels, labels_key("gpu.xid", labels), 2.0)
    assert healthy.action == "none"
    assert action_for("host.sxid", {"sxid": "12028"}) in ACTIONS
    assert action_for("gpu.recovery_action", {}, 2.0) == "drain_and_reboot"
    t = Transition("fp", "gpu.xid", labels, 1.0, "firing", "firing", "critical", "s")
    assert transition_message(t)["action"] == "drain_and_reboot"


RULES = """
[remediation]
max_running = 2
cooldown = "1h"
exclude_hosts = ["login-.*"]
exclude = ["rack=r9"]
[remediation.breaker]
max_share = 0.5
max_hosts = 3
window = "1h"
[[remediation.rule]]
name = "fatal"
match = ["rule=gpu.xid", "action=~drain_.*"]
mode = "{mode}"
  [[remediation.rule.step]]
  kind = "slurm_drain"
  [[remediation.rule.step]]
  kind = "exec"
  when = "resolved"
  argv = ["dcgmi", "diag", "-r", "2", "--host", "{{host}}"]
  [[remediation.rule.step]]
  kind = "slurm_resume"
"""


def cfg(mode: str = "auto", text: str = RULES) -> Any:
    import tomllib

    return remediation_config_from(tomllib.loads(text.format(mode=mode)))


def xid_alert(host: str, episode: int = 1, state: str = "firing", **labels: str) -> AlertView:
    lab = {"provider": "p", "host": host, "gpu": "0", "xid": "79", **labels}
    return AlertView(f"fp-{host}", episode, "gpu.xid", lab, "critical", "drain_and_reboot", state)


def firing(fp: str, rule: str, labels: dict[str, str], severity: str, action: str) -> AlertView:
    """A firing alert (its first episode)."""
    return AlertView(fp, 1, rule, labels, severity, action, "firing")


HOSTS: Mapping[str, int] = {"p": 10}


def test_auto_starts_at_once_holds_until_resolved_then_validates_and_resumes() -> None:
    c, st = cfg(), RemediationState()
    p = plan(st, c, [xid_alert("h1")], 100.0, HOSTS)
    (aid,) = p.run
    assert aid == action_id("fatal", "fp-h1", 1)
    a = st.actions[aid]
    assert (a.state, a.node, a.by) == ("running", "h1", "auto")
    assert engine.current_step(c, a) == 0
    p = engine.step_done(st, c, aid, StepResult(True, drained=True), 101.0, step="slurm_drain")
    assert a.state == "holding"
    assert plan(st, c, [xid_alert("h1")], 102.0, HOSTS).run == []  # still firing: holds
    p = plan(st, c, [], 103.0, HOSTS)  # resolved
    assert p.run == [aid]
    assert (a.phase, engine.current_step(c, a)) == ("resolved", 1)
    engine.step_done(st, c, aid, StepResult(True, exit_code=0), 104.0, step="exec")
    assert engine.current_step(c, a) == 2
    p = engine.step_done(st, c, aid, StepResult(True, undone=True), 105.0, step="slurm_resume")
    assert a.state == "done"
    assert "undone" in [e.event for e in p.events]


def test_a_failing_validation_leaves_the_action_failed() -> None:
    c, st = cfg(), RemediationState()
    (aid,) = plan(st, c, [xid_alert("h1")], 100.0, HOSTS).run
    engine.step_done(st, c, aid, StepResult(True, drained=True), 101.0, step="slurm_drain")
    plan(st, c, [], 102.0, HOSTS)
    p = engine.step_done(st, c, aid, StepResult(False, exit_code=3, output="diag failed"), 103.0, step="exec")
    assert st.actions[aid].state == "failed"
    assert [e.event for e in p.events] == ["step_failed", "failed"]


def test_decided_once_per_alert_episode_and_one_open_action_per_host() -> None:
    c, st = cfg(), RemediationState()
    plan(st, c, [xid_alert("h1")], 100.0, HOSTS)
    again = plan(st, c, [xid_alert("h1")], 101.0, HOSTS)
    assert again.events == []
    assert again.run == []
    other = firing(
        "fp-other", "gpu.xid", {"provider": "p", "host": "h1", "xid": "48"}, "critical", "drain_and_reset_gpu"
    )
    assert plan(st, c, [xid_alert("h1"), other], 102.0, HOSTS).run == []
    assert len(st.actions) == 1
    # restored from its records (a restart): still decided
    st2 = RemediationState({k: engine.Action.from_dict(v.to_dict()) for k, v in st.actions.items()})
    assert plan(st2, c, [xid_alert("h1")], 103.0, HOSTS).events == []


def test_dry_run_records_the_plan_and_runs_nothing() -> None:
    c, st = cfg("dry_run"), RemediationState()
    p = plan(st, c, [xid_alert("h1")], 100.0, HOSTS)
    assert p.run == []
    (a,) = st.actions.values()
    assert a.state == "planned"
    (planned,) = [e for e in p.events if e.event == "planned"]
    assert 'scontrol update NodeName=h1 State=DRAIN Reason="gpuwarden: fatal fp-h1"' in planned.step
    assert "dcgmi diag -r 2 --host {host}" in planned.step
    assert st.breakers == {}


def test_approve_waits_then_runs_deny_never_runs() -> None:
    c, st = cfg("approve"), RemediationState()
    assert plan(st, c, [xid_alert("h1"), xid_alert("h2")], 100.0, HOSTS).run == []
    a1, a2 = action_id("fatal", "fp-h1", 1), action_id("fatal", "fp-h2", 1)
    assert st.actions[a1].state == "awaiting_approval"
    engine.decide(st, a1, True, "bob", 101.0)
    engine.decide(st, a2, False, "bob", 101.0, "not now")
    with pytest.raises(ValueError, match="not awaiting"):
        engine.decide(st, a2, True, "bob", 101.5)
    p = plan(st, c, [xid_alert("h1"), xid_alert("h2")], 102.0, HOSTS)
    assert p.run == [a1]
    assert (st.actions[a2].state, st.actions[a2].reason) == ("denied", "not now")


def test_exclusions_and_cooldown_block() -> None:
    c, st = cfg(), RemediationState()
    plan(st, c, [xid_alert("login-1"), xid_alert("h3", rack="r9")], 100.0, HOSTS)
    assert {a.host: a.state for a in st.actions.values()} == {"login-1": "blocked", "h3": "blocked"}
    (aid,) = plan(st, c, [xid_alert("h1")], 100.0, HOSTS).run
    engine.step_done(st, c, aid, StepResult(True, drained=True), 101.0, step="slurm_drain")
    plan(st, c, [], 102.0, HOSTS)
    engine.step_done(st, c, aid, StepResult(True, exit_code=0), 103.0, step="exec")
    engine.step_done(st, c, aid, StepResult(True, undone=True), 104.0, step="slurm_resume")
    p = plan(st, c, [xid_alert("h1", episode=2)], 200.0, HOSTS)  # within the hour
    assert p.run == []
    assert st.actions[action_id("fatal", "fp-h1", 2)].reason.startswith("cooldown")
    assert plan(st, c, [xid_alert("h1", episode=3)], 100.0 + 3601, HOSTS).run != []


def test_at_most_max_running_then_the_queue_moves() -> None:
    c, st = cfg(), RemediationState()
    p = plan(st, c, [xid_alert(f"h{i}") for i in range(3)], 100.0, {"p": 100})
    assert len(p.run) == 2  # max_running
    queued = [a for a in st.actions.values() if a.state == "queued"]
    assert len(queued) == 1
    engine.step_done(st, c, p.run[0], StepResult(True, drained=True), 101.0, step="slurm_drain")  # -> holding
    assert plan(st, c, [xid_alert(f"h{i}") for i in range(3)], 102.0, {"p": 100}).run == [queued[0].id]


def test_the_breaker_trips_at_the_share_blocks_the_rest_and_resets() -> None:
    c, st = cfg(), RemediationState()  # max_share 0.5 of 4 hosts: 2; max_hosts 3
    firing = [xid_alert(f"h{i}") for i in range(4)]
    started: list[str] = []
    for t in range(4):  # one step at a time, as slots free up
        p = plan(st, c, firing, 100.0 + t, {"p": 4})
        started += p.run
        for aid in p.run:
            engine.step_done(st, c, aid, StepResult(True, drained=True), 100.5 + t, step="slurm_drain")
    assert len(started) == 2
    b = st.breakers["p"]
    assert b.tripped_at is not None
    assert "limit 2" in b.reason
    states = sorted(a.state for a in st.actions.values())
    assert states == ["blocked", "blocked", "holding", "holding"]
    assert sum(e.event == "breaker_tripped" for e in p.events) == 0  # tripped once, earlier
    later = plan(st, c, [*firing, xid_alert("h9")], 110.0, {"p": 4})
    assert later.run == []
    assert st.actions[action_id("fatal", "fp-h9", 1)].state == "blocked"
    engine.reset_breaker(st, "p", "bob", 120.0)
    assert b.tripped_at is None
    assert b.hosts == {}
    assert plan(st, c, [xid_alert("h10")], 121.0, {"p": 4}).run != []


def test_max_hosts_caps_a_large_provider() -> None:
    c, st = cfg(), RemediationState()  # 0.5 of 1000 hosts is 500, but max_hosts = 3
    c = type(c)(c.rules, 100, c.cooldown, c.exclude_hosts, c.exclude, c.breaker, c.slurm)
    p = plan(st, c, [xid_alert(f"h{i}") for i in range(5)], 100.0, {"p": 1000})
    assert len(p.run) == 3
    assert st.breakers["p"].tripped_at is not None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[remediation]\nmax_running = 0", "remediation.max_running"),
        (
            '[[remediation.rule]]\nname = "x"\nmode = "yolo"\n'
            '[[remediation.rule.step]]\nkind = "slurm_drain"',
            "remediation.rule[0].mode",
        ),
        ('[[remediation.rule]]\nname = "x"', "remediation.rule[0].step"),
        (
            '[[remediation.rule]]\nname = "x"\n[[remediation.rule.step]]\nkind = "exec"',
            "remediation.rule[0].step[0].argv",
        ),
        (
            '[[remediation.rule]]\nname = "x"\n[[remediation.rule.step]]\nkind = "slurm_resume"\n'
            '[[remediation.rule.step]]\nkind = "slurm_drain"',
            "remediation.rule[0].step[1]",
        ),
        (
            '[[remediation.rule]]\nname = "x"\n[[remediation.rule.step]]\nkind = "webhook"\nurl = "ftp://x"',
            "remediation.rule[0].step[0].url",
        ),
        ("[remediation.breaker]\nmax_share = 1.5", "remediation.breaker.max_share"),
        ('[remediation]\nexclude_hosts = ["("]', "remediation.exclude_hosts"),
        ("[remediation]\nbogus = 1", "remediation.bogus"),
    ],
)
def test_bad_config_names_the_key(text: str, key: str) -> None:
    import tomllib

    with pytest.raises(ConfigError) as e:
        remediation_config_from(tomllib.loads(text))
    assert e.value.key == key


def test_templates_substitute_names_only_and_nodes_map() -> None:
    assert render("{host}-{nope}-{0}", {"host": "h"}) == "h-{nope}-{0}"
    c = cfg(text=RULES + '[remediation.slurm]\nnode = "{{host}}-ib"\nnodes = {{ "h1" = "node001" }}\n')
    assert c.slurm.node_of("h1", {}) == "node001"
    assert c.slurm.node_of("h2", {}) == "h2-ib"


def test_scontrol_show_node_reason_with_spaces() -> None:
    line = (
        "NodeName=n1 Arch=x86_64 State=IDLE+DRAIN ThreadsPerCore=1 "
        "Reason=gpuwarden: fatal 9a98 [root@2026-11-28T15:10:22]"
    )
    f = parse_node(line)
    assert f["State"] == "IDLE+DRAIN"
    assert f["Reason"] == "gpuwarden: fatal 9a98 [root@2026-11-28T15:10:22]"


def test_a_host_that_recovers_before_approval_or_a_slot_is_not_acted_on() -> None:
    c, st = cfg("approve"), RemediationState()
    plan(st, c, [xid_alert("h1")], 100.0, HOSTS)
    p = plan(st, c, [], 101.0, HOSTS)  # resolved while awaiting approval
    (a,) = st.actions.values()
    assert a.state == "expired"
    assert [e.event for e in p.events] == ["expired"]
    with pytest.raises(ValueError, match="not awaiting"):
        engine.decide(st, a.id, True, "bob", 102.0)
    c, st = cfg(), RemediationState()  # auto, max_running 2: the third waits for a slot
    firing = [xid_alert(f"h{i}") for i in range(3)]
    p = plan(st, c, firing, 100.0, {"p": 100})
    waiting = next(a for a in st.actions.values() if a.state == "queued")
    p = plan(st, c, [f for f in firing if f.labels["host"] != waiting.host], 101.0, {"p": 100})
    assert waiting.state == "expired"
    assert p.run == []


async def test_exec_takes_the_alert_on_stdin_no_shell_and_a_timeout(tmp_path: Path) -> None:
    import sys

    from collector.remediation.executors import run_argv

    code, out = await run_argv(
        [sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])"], b'{"a": 1}', 10
    )
    assert code == 0
    assert out.strip() == '}1 :"a"{'
    code, out = await run_argv(["echo", "$(touch x)", "; ls"], b"", 10)  # arguments, not a shell line
    assert (code, out.strip()) == (0, "$(touch x) ; ls")
    code, out = await run_argv([sys.executable, "-c", "import time; time.sleep(30)"], b"", 0.5)
    assert code is None
    assert "timed out" in out
    code, _ = await run_argv([str(tmp_path / "missing")], b"", 1)
    assert code == 127


async def test_webhook_step_is_signed_like_the_notification_webhook() -> None:
    import json
    import tomllib

    from collector.notify.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
    from collector.remediation.executors import Executor
    from tests.support.collector import Receiver

    async with Receiver() as rx:
        text = f"""
[[remediation.rule]]
name = "ticket"
mode = "auto"
[[remediation.rule.step]]
kind = "webhook"
url = "{rx.url}"
secret = "s3cret"
"""
        c = remediation_config_from(tomllib.loads(text))
        st = RemediationState()
        (aid,) = plan(st, c, [xid_alert("h1")], 100.0, HOSTS).run
        ex = Executor(c)
        res = await ex.run(st.actions[aid], c.rules[0].steps[0], {"id": "fp-h1", "rule": "gpu.xid"})
        await ex.close()
        assert res.ok
        ((headers, body, _),) = rx.received
    assert verify(b"s3cret", body, headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER])
    msg = json.loads(body)
    assert msg["type"] == "remediation"
    assert msg["action"]["host"] == "h1"
    assert msg["alert"]["rule"] == "gpu.xid"


def test_a_lasting_warning_elsewhere_does_not_hold_the_node_but_a_critical_does() -> None:
    c, st = cfg(), RemediationState()
    (aid,) = plan(st, c, [xid_alert("h1")], 100.0, HOSTS).run
    engine.step_done(st, c, aid, StepResult(True, drained=True), 101.0, step="slurm_drain")
    disk = firing(
        "fp-disk", "host.disk", {"provider": "p", "host": "h1", "mount": "/"}, "warning", "check_host"
    )
    lost = firing(
        "fp-lost", "gpu.lost", {"provider": "p", "host": "h1", "gpu": "3"}, "critical", "drain_and_reboot"
    )
    assert plan(st, c, [lost, disk], 102.0, HOSTS).run == []
    assert st.actions[aid].state == "holding"
    assert plan(st, c, [disk], 103.0, HOSTS).run == [aid]


def test_the_examples_of_docs_remediation_md_are_valid_config() -> None:
    import tomllib

    text = (ROOT / "docs" / "remediation.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for b in blocks:
        c = remediation_config_from(tomllib.loads(b))
        assert c.rules
    k8s = remediation_config_from(tomllib.loads(blocks[-1])).rules[0]
    assert [s.argv[:2] for s in k8s.steps] == [
        ("kubectl", "cordon"),
        ("kubectl", "taint"),
        ("kubectl", "taint"),
        ("kubectl", "uncordon"),
    ]
