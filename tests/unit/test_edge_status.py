"""An EdgeFleet's decisions and status, step by step: PURE (no API, no clock of its own)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubeinfer_operator.reconcile import edge_status as es
from kubeinfer_operator.reconcile.compile_status import PodView
from kubeinfer_operator.reconcile.transform_observe import JobView
from kubeinfer_runtime.contract.edge import (
    FleetStatus,
    RolloutPhase,
    RolloutStatus,
    WaveStatus,
)

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
KEY = "A" * 43 + "="
V1, V2 = "aaaaaaaaaa", "bbbbbbbbbb"
HASHES = {"x86": "h-x86", "arm": "h-arm"}
JOBS = {"x86": "sensors-pkg-1", "arm": "sensors-pkg-2"}
SIGNING = "Secret ml/signing key key (spec.signing.keySecret)"
SERVER_SECRETS = ("Secret ml/boot key token (spec.registration.bootstrapTokenSecret)",
                  "Secret ml/redis key url (spec.redis.urlSecret)")


def info(status: dict[str, Any] | None = None, *, version: str = V1,
         generation: int = 1) -> es.FleetInfo:
    return es.FleetInfo(name="sensors", namespace="ml", generation=generation,
                        version=version, model="s3://models/mlp.onnx", run_hashes=HASHES,
                        job_names=JOBS, status=status or {}, replicas=2,
                        url="http://sensors-fleet-server.ml.svc:8080",
                        signing_secret=SIGNING, server_secrets=SERVER_SECRETS)


def report(target: str, version: str = V1, key: str = KEY) -> str:
    return json.dumps({"uri": f"s3://p/{version}/{target}", "sha256": "ab" * 32, "size": 7,
                       "signature": "c2ln", "publicKey": key, "version": version,
                       "target": target})


def done(target: str, version: str = V1, run_hash: str | None = None) -> es.Build:
    return es.Build(job=JobView(exists=True, run_hash=run_hash or HASHES[target],
                                complete=True, succeeded=1),
                    pods=(PodView(name=f"{JOBS[target]}-abcde", phase="Succeeded",
                                  exit_code=0, message=report(target, version),
                                  finished_at="2025-05-01T11:59:00Z"),))


def running(target: str) -> es.Build:
    return es.Build(job=JobView(exists=True, run_hash=HASHES[target], active=1))


def fleet(phase: RolloutPhase, version: str = V1, *, wave: int = 0, waves: int = 2,
          devices: int = 10, message: str = "") -> FleetStatus:
    current = WaveStatus(index=wave, devices=4, succeeded=3, failed=1, pending=0,
                         successPercent=75.0, failurePercent=25.0)
    return FleetStatus(fleet="sensors", devices=devices,
                       byState={"Online": devices - 2, "Offline": 2},
                       byVersion={version: devices},
                       rollout=RolloutStatus(version=version, previousVersion=None, phase=phase,
                                             wave=wave, waves=waves, currentWave=current,
                                             message=message))


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def summary(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def packaged(version: str = V1) -> dict[str, Any]:
    """A status whose current version is ``version``."""
    d = es.decide(info(version=version),
                  es.Observed(builds={t: done(t, version) for t in HASHES}), NOW)
    return d.status


# -- packaging ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("builds", "create", "packaged_", "ready", "phase"), [
    ({}, ("x86", "arm"), ("False", "Packaging"), ("False", "Packaging"), "Packaging"),
    ({"x86": running("x86")}, ("arm",), ("False", "Packaging"), ("False", "Packaging"),
     "Packaging"),
    ({"x86": done("x86"), "arm": running("arm")}, (), ("False", "Packaging"),
     ("False", "Packaging"), "Packaging"),
    ({"x86": done("x86"), "arm": done("arm")}, (), ("True", "Packaged"),
     ("False", "ServerUnavailable"), "RollingOut"),
], ids=["nothing", "one-running", "one-done", "all-done"])
def test_packaging_steps(builds: dict[str, es.Build], create: tuple[str, ...],
                         packaged_: tuple[str, str], ready: tuple[str, str],
                         phase: str) -> None:
    d = es.decide(info(), es.Observed(builds=builds), NOW)
    assert d.create == create
    assert summary(d.status)[es.PACKAGED] == packaged_
    assert summary(d.status)[es.READY] == ready
    assert d.status["phase"] == phase
    assert d.status["observedGeneration"] == 1 and d.status["desiredVersion"] == V1
    for c in d.status["conditions"]:
        assert c["message"][0].isupper() and not c["message"].endswith("."), c


def test_reports_are_kept_as_they_come_and_promoted_together() -> None:
    first = es.decide(info(), es.Observed(builds={"x86": done("x86"),
                                                  "arm": running("arm")}), NOW)
    assert first.current is None
    assert [p["target"] for p in first.status["building"]["packages"]] == ["x86"]
    # The x86 Job is gone (TTL): its report is in status, so it is not built again.
    second = es.decide(info(first.status), es.Observed(builds={"arm": done("arm")}), NOW)
    assert second.create == ()
    assert second.current is not None and second.current.version == V1
    assert {p.target for p in second.current.packages} == {"x86", "arm"}
    assert second.current.publicKey == KEY and second.previous is None
    assert second.status["building"] is None and second.status["version"] == V1
    assert "Packaging" in cond(first.status, es.PACKAGED)["message"]
    assert "1 of 2 targets built (waiting for arm)" in cond(first.status, es.PACKAGED)[
        "message"]


def test_a_new_version_keeps_the_old_one_as_previous() -> None:
    status = packaged(V1)
    building = es.decide(info(status, version=V2, generation=2), es.Observed(), NOW)
    assert building.create == ("x86", "arm")
    # Until V2 is built the fleet keeps serving V1.
    assert building.current is not None and building.current.version == V1
    assert building.status["version"] == V1 and building.status["phase"] == "Packaging"
    done_ = es.decide(info(building.status, version=V2, generation=2),
                      es.Observed(builds={t: done(t, V2) for t in HASHES}), NOW)
    assert done_.current is not None and done_.current.version == V2
    assert done_.previous is not None and done_.previous.version == V1
    assert (done_.status["version"], done_.status["previousVersion"]) == (V2, V1)
    # Back to V1: swapped, nothing packaged again.
    back = es.decide(info(done_.status, version=V1, generation=3), es.Observed(), NOW)
    assert back.create == ()
    assert back.current is not None and back.current.version == V1
    assert back.previous is not None and back.previous.version == V2


def test_a_report_of_another_version_or_target_is_no_report() -> None:
    wrong = done("x86", V2)  # the pod says V2, the Job is V1's
    d = es.decide(info(), es.Observed(builds={"x86": wrong, "arm": done("arm")}), NOW)
    assert summary(d.status)[es.PACKAGED] == ("False", "NoReport")
    assert "delete Job ml/sensors-pkg-1 to retry" in cond(d.status, es.PACKAGED)["message"]


def test_a_job_of_another_spec_is_deleted_then_made_again() -> None:
    d = es.decide(info(), es.Observed(builds={"x86": done("x86", run_hash="other"),
                                              "arm": running("arm")}), NOW)
    assert d.delete == ("x86",) and d.create == ()


@pytest.mark.parametrize(("build", "reason", "fragment"), [
    (es.Build(job=JobView(exists=True, run_hash="h-arm", failed=1,
                          failure=("PodFailurePolicy", "exited with 42")),
              pods=(PodView(name="sensors-pkg-2-x", phase="Failed", exit_code=42,
                            message=json.dumps({"error": "Model is not ONNX"})),)),
     "BadInput", "Model is not ONNX (pod ml/sensors-pkg-2-x, exit code 42); fix spec.model"),
    (es.Build(job=JobView(exists=True, run_hash="h-arm", failed=3,
                          failure=("BackoffLimitExceeded", "backoff")),
              pods=(PodView(name="sensors-pkg-2-y", phase="Failed", exit_code=137,
                            message="Killed"),)),
     "PackagingFailed", "Killed (pod ml/sensors-pkg-2-y, exit code 137"),
    (es.Build(job=JobView(exists=True, run_hash="h-arm",
                          failure=("DeadlineExceeded", "too long"))),
     "DeadlineExceeded", "ran past its deadline"),
])
def test_a_failed_package_job_fails_packaged(build: es.Build, reason: str,
                                             fragment: str) -> None:
    d = es.decide(info(), es.Observed(builds={"x86": done("x86"), "arm": build}), NOW)
    assert summary(d.status)[es.PACKAGED] == ("False", reason)
    assert fragment in cond(d.status, es.PACKAGED)["message"]
    assert d.status["phase"] == "Failed" and d.create == ()
    assert summary(d.status)[es.READY] == ("False", "Packaging")


def test_a_running_package_job_names_the_signing_secret_to_check() -> None:
    # The operator does not read the signing key's Secret: a missing one leaves the Job's
    # pod in CreateContainerConfigError, so the Packaging message says what to check.
    d = es.decide(info(), es.Observed(builds={"x86": running("x86")}), NOW)
    assert d.create == ("arm",)
    packaging = cond(d.status, es.PACKAGED)
    assert packaging["reason"] == "Packaging"
    assert packaging["message"] == (
        f"Packaging version {V1}: 0 of 2 targets built (waiting for x86, arm); if a package "
        "Job's pod does not start (CreateContainerConfigError), check Secret ml/signing key "
        "key (spec.signing.keySecret)")
    # Nothing started yet: nothing to check.
    fresh = es.decide(info(), es.Observed(), NOW)
    assert "Secret" not in cond(fresh.status, es.PACKAGED)["message"]


def test_a_package_job_past_its_deadline_names_the_signing_secret() -> None:
    stuck = es.Build(job=JobView(exists=True, run_hash=HASHES["x86"],
                                 failure=(es.REASON_DEADLINE, "")))
    d = es.decide(info(), es.Observed(builds={"x86": stuck, "arm": running("arm")}), NOW)
    packaged_ = cond(d.status, es.PACKAGED)
    assert packaged_["reason"] == "DeadlineExceeded"
    assert "check Secret ml/signing key key (spec.signing.keySecret)" in packaged_["message"]


def test_an_unavailable_fleet_server_names_the_secrets_its_pods_read() -> None:
    d = es.decide(info(packaged()), es.Observed(server_exists=True, server_available=0), NOW)
    ready = cond(d.status, es.READY)
    assert ready["reason"] == "ServerUnavailable"
    assert ready["message"] == (
        "Fleet server Deployment ml/sensors-fleet-server has no available replica (0/2); if "
        "its pods do not start (CreateContainerConfigError), check Secret ml/boot key token "
        "(spec.registration.bootstrapTokenSecret) and Secret ml/redis key url "
        "(spec.redis.urlSecret); kubectl describe deployment -n ml sensors-fleet-server says "
        "why")


# -- serving and rolling out -------------------------------------------------------------------


@pytest.mark.parametrize(("observed", "ready", "complete", "back", "phase"), [
    (es.Observed(server_available=0, fleet_error="not deployed"),
     ("False", "ServerUnavailable"), ("Unknown", "FleetStatusUnavailable"),
     ("False", "NotRolledBack"), "RollingOut"),
    (es.Observed(server_available=2, fleet=fleet(RolloutPhase.PROGRESSING)),
     ("True", "Serving"), ("False", "Progressing"), ("False", "NotRolledBack"), "RollingOut"),
    (es.Observed(server_available=2, fleet=fleet(RolloutPhase.COMPLETE, wave=2)),
     ("True", "Serving"), ("True", "Complete"), ("False", "NotRolledBack"), "Complete"),
    (es.Observed(server_available=1, fleet=fleet(RolloutPhase.ROLLED_BACK,
                                                 message="wave 1 failed")),
     ("True", "Serving"), ("False", "RolledBack"), ("True", "WaveFailed"), "RolledBack"),
    (es.Observed(server_available=1, fleet=fleet(RolloutPhase.PAUSED)),
     ("True", "Serving"), ("False", "Paused"), ("False", "NotRolledBack"), "Paused"),
    (es.Observed(server_available=1, fleet=fleet(RolloutPhase.PROGRESSING, version=V2)),
     ("True", "Serving"), ("False", "WaitingForFleetServer"), ("False", "NotRolledBack"),
     "RollingOut"),
    (es.Observed(server_available=1, server_problem="Secret ml/kubeinfer-runtime exists and "
                 "is not managed by kubeinfer", fleet_error="no status token to ask with"),
     ("False", "NameConflict"), ("Unknown", "FleetStatusUnavailable"),
     ("False", "NotRolledBack"), "RollingOut"),
], ids=["no-server", "progressing", "complete", "rolled-back", "paused", "stale-config",
        "no-token"])
def test_rollout_table(observed: es.Observed, ready: tuple[str, str],
                       complete: tuple[str, str], back: tuple[str, str], phase: str) -> None:
    d = es.decide(info(packaged()), observed, NOW)
    s = summary(d.status)
    assert (s[es.READY], s[es.ROLLOUT_COMPLETE], s[es.ROLLED_BACK]) == (ready, complete, back)
    assert d.status["phase"] == phase
    for c in d.status["conditions"]:
        assert c["message"][0].isupper() and not c["message"].endswith("."), c


def test_the_fleets_counts_become_the_status() -> None:
    d = es.decide(info(packaged()), es.Observed(server_available=2,
                                                fleet=fleet(RolloutPhase.PROGRESSING)), NOW)
    st = d.status
    assert (st["devices"], st["online"], st["wave"]) == (10, 8, "1/2")
    assert st["devicesByState"] == {"Offline": 2, "Online": 8}
    assert st["devicesByVersion"] == {V1: 10}
    assert st["currentWave"]["successPercent"] == 75.0
    assert st["currentWave"]["failurePercent"] == 25.0
    assert st["lastFleetStatusTime"] == "2025-05-01T12:00:00Z"
    assert cond(st, es.ROLLOUT_COMPLETE)["message"] == (
        f"Rolling out version {V1}: wave 1/2: 75% of its 4 devices succeeded, 25% failed")
    assert st["fleetServer"] == "http://sensors-fleet-server.ml.svc:8080"


def test_rollback_names_both_versions_and_the_fix() -> None:
    status = packaged(V1)
    status = es.decide(info(status, version=V2, generation=2),
                       es.Observed(builds={t: done(t, V2) for t in HASHES}), NOW).status
    d = es.decide(info(status, version=V2, generation=2),
                  es.Observed(server_available=2, fleet=fleet(
                      RolloutPhase.ROLLED_BACK, V2, message="wave 1 failure 25% > 5%")), NOW)
    message = cond(d.status, es.ROLLED_BACK)["message"]
    assert message.startswith(f"Version {V2} was rolled back to {V1} at wave 1/2")
    assert "(wave 1 failure 25% > 5%)" in message and "spec.rollout.waves" in message


def test_rollout_complete_and_rolled_back_are_monotonic_per_generation() -> None:
    complete = es.decide(info(packaged()), es.Observed(
        server_available=2, fleet=fleet(RolloutPhase.COMPLETE)), NOW).status
    later = NOW + timedelta(minutes=5)
    # The fleet server is unreachable for a while: Complete stays, with its time.
    kept = es.decide(info(complete), es.Observed(server_available=2,
                                                 fleet_error="GET failed"), later).status
    assert summary(kept)[es.ROLLOUT_COMPLETE] == ("True", "Complete")
    assert cond(kept, es.ROLLOUT_COMPLETE)["lastTransitionTime"] == cond(
        complete, es.ROLLOUT_COMPLETE)["lastTransitionTime"]
    assert kept["phase"] == "Complete"
    # The last counts are not written over (the status patch merges): they stay as read.
    assert "devices" not in kept and "lastFleetStatusTime" not in kept
    # A new generation starts over.
    fresh = es.decide(info(complete, generation=2), es.Observed(
        server_available=2, fleet=fleet(RolloutPhase.PROGRESSING)), later).status
    assert summary(fresh)[es.ROLLOUT_COMPLETE] == ("False", "Progressing")
    back = es.decide(info(packaged()), es.Observed(
        server_available=2, fleet=fleet(RolloutPhase.ROLLED_BACK)), NOW).status
    still = es.decide(info(back), es.Observed(
        server_available=2, fleet=fleet(RolloutPhase.PROGRESSING)), later).status
    assert summary(still)[es.ROLLED_BACK] == ("True", "WaveFailed")
    assert still["phase"] == "RolledBack"


def test_transition_times_move_only_on_a_flip() -> None:
    first = es.decide(info(), es.Observed(), NOW).status
    again = es.decide(info(first), es.Observed(builds={"x86": running("x86")}),
                      NOW + timedelta(seconds=30)).status
    assert cond(again, es.PACKAGED)["lastTransitionTime"] == "2025-05-01T12:00:00Z"


def test_invalid_spec_keeps_what_was_packaged() -> None:
    status = packaged()
    out = es.invalid_status(info(status, generation=2),
                            "EdgeFleet ml/sensors is invalid: spec.packages.uri: use s3", NOW)
    assert summary({**status, **out})[es.READY] == ("False", "InvalidSpec")
    assert out["observedGeneration"] == 2 and "current" not in out


def test_after_a_rollback_the_next_version_rolls_back_to_what_devices_run() -> None:
    """V2 was rolled back (devices run V1): V3's rollback target is V1, not the refused V2."""
    v3 = "cccccccccc"
    status = es.decide(info(packaged(V1), version=V2, generation=2),
                       es.Observed(builds={t: done(t, V2) for t in HASHES}), NOW).status
    tripped = fleet(RolloutPhase.ROLLED_BACK, V2)
    status = es.decide(info(status, version=V2, generation=2),
                       es.Observed(fleet=tripped, server_exists=True), NOW).status
    assert status["phase"] == "RolledBack"
    for observed in (es.Observed(builds={t: done(t, v3) for t in HASHES}, fleet=tripped),
                     # The server unreachable meanwhile: the last status says it.
                     es.Observed(builds={t: done(t, v3) for t in HASHES},
                                 fleet_error="unreachable")):
        d = es.decide(info(status, version=v3, generation=3), observed, NOW)
        assert d.current is not None and d.current.version == v3
        assert d.previous is not None and d.previous.version == V1
    # A completed rollout's version is the next one's rollback target.
    done_v2 = es.decide(info(status, version=V2, generation=2),
                        es.Observed(fleet=fleet(RolloutPhase.COMPLETE, V2)), NOW).status
    d = es.decide(info(done_v2, version=v3, generation=3),
                  es.Observed(builds={t: done(t, v3) for t in HASHES},
                              fleet=fleet(RolloutPhase.COMPLETE, V2)), NOW)
    assert d.previous is not None and d.previous.version == V2
