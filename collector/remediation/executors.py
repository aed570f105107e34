"""The I/O edge of remediation: scontrol, exec and webhook steps.

Each returns a :class:`StepResult`; none raises for a failing command (the failure is the
result, audited with its exit code and the tail of its output).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from collector.notify.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from collector.remediation.config import RemediationConfig, Step, render
from collector.remediation.engine import Action, StepResult, drain_reason
from shared.redact import redact

OUTPUT_TAIL: Final = 4096
OURS: Final = "gpuwarden:"  # the prefix of every drain reason gpuwarden writes


async def run_argv(
    argv: list[str], stdin: bytes, limit_s: float, env: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """Run ``argv`` (no shell) with ``stdin``; exit code (``None`` on timeout) and output tail."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except OSError as e:
        return 127, f"{argv[0]}: {e}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), limit_s)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return None, (out or b"").decode(errors="replace")[
            -OUTPUT_TAIL:
        ] + f"\n(timed out after {limit_s:g} s)"
    return proc.returncode, (out or b"").decode(errors="replace")[-OUTPUT_TAIL:]


def parse_node(text: str) -> dict[str, str]:
    """``scontrol -o show node``'s ``Key=Value`` fields (a value may hold spaces: Reason)."""
    out: dict[str, str] = {}
    key = ""
    for tok in text.strip().split(" "):
        k, eq, v = tok.partition("=")
        if eq and k and k[0].isupper() and k.isalnum():
            key = k
            out[key] = v
        elif key:
            out[key] += " " + tok
    return out


class Executor:
    def __init__(self, cfg: RemediationConfig) -> None:
        self.cfg = cfg
        self.env = dict(os.environ)
        if cfg.slurm.conf:
            self.env["SLURM_CONF"] = cfg.slurm.conf
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def run(self, act: Action, step: Step, alert: Mapping[str, Any]) -> StepResult:
        if step.kind == "slurm_drain":
            return await self.drain(act)
        if step.kind == "slurm_resume":
            return await self.resume(act)
        if step.kind == "exec":
            return await self.exec(act, step, alert)
        return await self.webhook(act, step, alert)

    async def scontrol(self, *args: str) -> tuple[int | None, str]:
        return await run_argv([self.cfg.slurm.scontrol, *args], b"", 30.0, self.env)

    async def show(self, node: str) -> tuple[dict[str, str] | None, str]:
        code, out = await self.scontrol("-o", "show", "node", node)
        if code != 0:
            return None, out
        return parse_node(out), out

    async def drain(self, act: Action) -> StepResult:
        node, reason = act.node, drain_reason(act)
        info, out = await self.show(node)
        if info is None:
            return StepResult(False, None, out, why=f"scontrol show node {node} failed")
        state = info.get("State", "")
        if "DRAIN" in state:  # drained once: by us before a restart, or by an operator
            ours = info.get("Reason", "").startswith(OURS)
            why = (
                "already drained by gpuwarden"
                if ours
                else f"already drained by an operator: {info.get('Reason', '')}"
            )
            return StepResult(True, 0, "", drained=ours, why=why)
        code, out = await self.scontrol("update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}")
        return StepResult(
            code == 0, code, out, drained=code == 0, why="" if code == 0 else "scontrol update failed"
        )

    async def resume(self, act: Action) -> StepResult:
        node = act.node
        if not act.drained:
            return StepResult(True, None, "", why=f"not resumed: gpuwarden did not drain {node}")
        info, out = await self.show(node)
        if info is None:
            return StepResult(False, None, out, why=f"scontrol show node {node} failed")
        reason = info.get("Reason", "")
        if "DRAIN" not in info.get("State", ""):
            return StepResult(True, None, "", why=f"{node} is no longer drained")
        if not reason.startswith(OURS):  # an operator took it over: never undo their drain
            return StepResult(True, None, "", why=f"not resumed: drained by an operator ({reason})")
        code, out = await self.scontrol("update", f"NodeName={node}", "State=RESUME")
        return StepResult(
            code == 0, code, out, undone=code == 0, why="" if code == 0 else "scontrol update failed"
        )

    def values(self, act: Action) -> dict[str, str]:
        return {
            **act.labels,
            "host": act.host,
            "node": act.node,
            "provider": act.provider,
            "rule": act.rule,
            "alert": act.fingerprint,
            "alert_rule": act.alert_rule,
            "severity": act.severity,
            "action": act.action,
            "action_id": act.id,
        }

    async def exec(self, act: Action, step: Step, alert: Mapping[str, Any]) -> StepResult:
        argv = [render(a, self.values(act)) for a in step.argv]
        stdin = json.dumps(alert).encode()
        code, out = await run_argv(argv, stdin, step.timeout, self.env)
        why = "" if code == 0 else ("timed out" if code is None else f"exit code {code}")
        return StepResult(code == 0, code, out, why=why)

    async def webhook(self, act: Action, step: Step, alert: Mapping[str, Any]) -> StepResult:
        body = json.dumps({"type": "remediation", "action": act.to_dict(), "alert": dict(alert)}).encode()
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: ts, "X-Gpuwarden-Action": act.id}
        if step.secret is not None:
            headers[SIGNATURE_HEADER] = sign(step.secret.reveal().encode(), body, ts)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                step.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=step.timeout)
            ) as resp:
                text = (await resp.text())[-OUTPUT_TAIL:]
                ok = 200 <= resp.status < 300
                return StepResult(ok, resp.status, text, why="" if ok else f"HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as e:
            return StepResult(False, None, "", why=redact(f"webhook: {str(e) or type(e).__name__}"))
