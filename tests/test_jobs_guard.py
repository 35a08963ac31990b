"""The access guard: exposed servers refuse jobs unless --enable-insecure-extension-access is set."""

from types import SimpleNamespace

import pytest

from bksdm_ext.jobs.guard import AccessDenied, AccessGuard, is_loopback


def webui_opts(**flags):
    base = dict(share=False, listen=False, ngrok=None, server_name=None, nowebui=False,
                enable_insecure_extension_access=False)
    return SimpleNamespace(**{**base, **flags})


@pytest.mark.parametrize("flags, bound, reason", [
    (dict(share=True), "127.0.0.1", "--share"),
    (dict(ngrok="token"), "127.0.0.1", "--ngrok"),
    (dict(listen=True), "0.0.0.0", "--listen binds 0.0.0.0"),
    (dict(server_name="0.0.0.0"), "0.0.0.0", "--server-name 0.0.0.0 is not a loopback address"),
    (dict(server_name="::"), "::", "--server-name :: is not a loopback address"),
    (dict(server_name="192.168.1.20"), "192.168.1.20", "not a loopback"),
    (dict(nowebui=True), "0.0.0.0", "API-only server (--nowebui) binds 0.0.0.0"),
    (dict(server_name="no-such-host.invalid"), "no-such-host.invalid", "not a loopback"),
])
def test_exposed_servers_refuse_jobs_without_the_flag(flags, bound, reason):
    guard = AccessGuard.from_cmd_opts(webui_opts(**flags), environ={})
    assert guard.bound_host == bound
    assert reason in guard.exposure
    assert not guard.allowed
    with pytest.raises(AccessDenied, match="Creating a job is refused: .*--enable-insecure-extension-access"):
        guard.check("Creating a job")
    allowed = AccessGuard.from_cmd_opts(webui_opts(**flags, enable_insecure_extension_access=True), environ={})
    assert allowed.allowed
    allowed.check("Creating a job")


@pytest.mark.parametrize("flags", [
    dict(),
    dict(server_name="127.0.0.1"),  # the WebUI itself calls any --server-name non-local; the bound address is local
    dict(server_name="127.0.0.2"),
    dict(server_name="localhost"),
    dict(server_name="::1"),
    dict(server_name="[::1]"),
    dict(nowebui=True, server_name="127.0.0.1"),
])
def test_local_servers_allow_jobs(flags):
    guard = AccessGuard.from_cmd_opts(webui_opts(**flags), environ={})
    assert guard.exposure is None and guard.allowed
    guard.check("Creating a job")


def test_gradio_env_default_host_counts():
    guard = AccessGuard.from_cmd_opts(webui_opts(), environ={"GRADIO_SERVER_NAME": "0.0.0.0"})
    assert guard.bound_host == "0.0.0.0" and "$GRADIO_SERVER_NAME" in guard.exposure
    with pytest.raises(AccessDenied):
        guard.check("Resuming a job")


def test_missing_flags_of_older_webuis_are_off():
    guard = AccessGuard.from_cmd_opts(SimpleNamespace(listen=False), environ={})
    assert guard.allowed and guard.bound_host == "127.0.0.1"


def test_loopback_names():
    assert is_loopback("127.5.5.5") and is_loopback("LOCALHOST") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("::")


def test_bksdm_app_binds_loopback_unless_told():
    from bksdm_ext.cli import build_parser
    from bksdm_ext.commands.app import app_guard

    default = build_parser().parse_args(["app"])
    assert (default.host, default.port) == ("127.0.0.1", 7870) and app_guard(default).allowed
    exposed = build_parser().parse_args(["app", "--host", "0.0.0.0"])
    assert "--host 0.0.0.0 is not a loopback address" in app_guard(exposed).exposure
    assert not app_guard(exposed).allowed
    assert app_guard(build_parser().parse_args(["app", "--host", "0.0.0.0", "--enable-insecure-extension-access"])).allowed
