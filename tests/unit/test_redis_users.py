"""Each namespace's Redis user (render.redis_users): distinct, derived, confined."""

from __future__ import annotations

import base64
from urllib.parse import urlsplit

import pytest

from kubeinfer_operator.render import k8s_secrets
from kubeinfer_operator.render import redis_users as ru
from kubeinfer_operator.settings import OperatorSettings

ADMIN = "redis://:admin-secret@redis.kubeinfer-system.svc:6379/0"


def test_each_namespace_gets_its_own_user_and_password() -> None:
    a, b = ru.namespace_url(ADMIN, "team-a"), ru.namespace_url(ADMIN, "team-b")
    pa, pb = urlsplit(a), urlsplit(b)
    assert (pa.username, pb.username) == ("kubeinfer-ns-team-a", "kubeinfer-ns-team-b")
    assert pa.password and pb.password and pa.password != pb.password
    assert pa.password == ru.password(ADMIN, "team-a")  # derived: every replica agrees
    assert (pa.hostname, pa.port, pa.path) == ("redis.kubeinfer-system.svc", 6379, "/0")
    assert "admin-secret" not in a and "admin-secret" not in b


def test_a_new_admin_password_changes_every_namespace_password() -> None:
    other = ADMIN.replace("admin-secret", "rotated")
    assert ru.password(other, "team-a") != ru.password(ADMIN, "team-a")


@pytest.mark.parametrize(("admin", "expected"), [
    ("rediss://default:pw@10.0.0.7:6380/2?ssl_cert_reqs=required",
     "rediss://kubeinfer-ns-ns:{pw}@10.0.0.7:6380/2?ssl_cert_reqs=required"),
    ("redis://host", "redis://kubeinfer-ns-ns:{pw}@host"),
    ("redis://[::1]:6379/0?password=admin&username=root&socket_timeout=5",
     "redis://kubeinfer-ns-ns:{pw}@[::1]:6379/0?socket_timeout=5"),
])
def test_the_url_keeps_where_and_how_but_never_the_operators_credentials(
        admin: str, expected: str) -> None:
    assert ru.namespace_url(admin, "ns") == expected.format(pw=ru.password(admin, "ns"))


@pytest.mark.parametrize("admin", ["unix:///var/run/redis.sock", "http://redis:6379",
                                   "redis://:pw@/0"])
def test_urls_that_cannot_name_a_user_are_refused(admin: str) -> None:
    with pytest.raises(ru.RedisUrlError, match="redis://host"):
        ru.namespace_url(admin, "ns")


def test_the_rules_confine_keys_to_the_namespace_queues() -> None:
    rules = ru.acl_rules(ADMIN, "team-a")
    assert rules[:2] == ["reset", "on"]
    assert "~kubeinfer:async:{team-a.*" in rules
    assert [r for r in rules if r.startswith("~")] == ["~kubeinfer:async:{team-a.*"]
    assert "resetchannels" in rules and "-@admin" in rules and "-@dangerous" in rules
    assert ">" + ru.password(ADMIN, "team-a") in rules
    # A namespace is a DNS label (no dot): "team" cannot match "team-a"'s queues.
    assert not ru.key_pattern("team").endswith("team-a.*")


def _secret_url(settings: OperatorSettings, namespace: str) -> str:
    data = k8s_secrets.runtime_secret_data(namespace, settings)
    return base64.b64decode(data[k8s_secrets.KEY_REDIS_URL]).decode()


def test_the_runtime_secret_carries_the_namespace_user_unless_turned_off() -> None:
    on = OperatorSettings(redis_url=ADMIN)
    assert _secret_url(on, "team-a") == ru.namespace_url(ADMIN, "team-a")
    off = OperatorSettings(redis_url=ADMIN, redis_acl=False)
    assert _secret_url(off, "team-a") == ADMIN


def test_an_operator_url_that_cannot_name_users_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="KUBEINFER_REDIS_ACL"):
        OperatorSettings(redis_url="unix:///run/redis.sock")
    assert OperatorSettings(redis_url="unix:///run/redis.sock", redis_acl=False).redis_url


def test_a_password_with_an_unencoded_slash_is_refused_without_quoting_it() -> None:
    # urllib reads "app:c2Vj" as host:port; its ValueError quoted the port, the start of
    # the password, into the operator's log.
    admin = "redis://app:c2Vj/cmV0@redis:6379/0"
    with pytest.raises(ru.RedisUrlError) as refused:
        ru.namespace_url(admin, "ns")
    assert "c2Vj" not in str(refused.value) and "cmV0" not in str(refused.value)


@pytest.mark.parametrize("acl", [True, False])
def test_operator_settings_errors_quote_no_credential(acl: bool) -> None:
    # A ValidationError's text quoted its input (for a model validator, every setting, cut
    # to its ends): `kubeinfer operator` with only this URL set logged it whole.
    with pytest.raises(ValueError) as bad_url:
        OperatorSettings(redis_url="redis://:c2Vj/cmV0@redis:6379/0", redis_acl=acl)
    text = str(bad_url.value)
    assert "KUBEINFER_REDIS_URL" in text and "input_value" not in text
    assert "c2Vj" not in text and "cmV0" not in text
    with pytest.raises(ValueError) as clash:
        OperatorSettings(redis_url="redis://:pw@r", redis_acl=acl,
                         caller_secret_access_key="TOPSECRET", metrics_port=8080,
                         runtime_port=8080)
    text = str(clash.value)
    assert "metrics_port and runtime_port" in text and "input_value" not in text
    assert ":pw@" not in text and "TOPSECRET" not in text
