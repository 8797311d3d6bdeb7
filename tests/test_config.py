"""The settings table: kwargs, environment variables and CLI flags from one source."""

from __future__ import annotations

import pytest

from rtserve.cli import build_parser, load_app
from rtserve.config import SETTINGS, Config, ConfigError


def test_defaults():
    cfg = Config(_env={})
    assert cfg.threads == 8
    assert cfg.backlog == 1024
    assert cfg.max_body_size == 1 << 20
    assert cfg.max_request_line == 8192
    assert cfg.max_header_block == 65536
    assert cfg.max_header_count == 100
    assert cfg.deadline_ms == 0


def test_kwargs_are_cast_and_validated():
    cfg = Config(_env={}, threads="4", header_timeout="2.5", access_log="yes")
    assert cfg.threads == 4 and cfg.header_timeout == 2.5 and cfg.access_log is True


def test_unknown_setting_is_named():
    with pytest.raises(ConfigError, match="'thread'"):
        Config(_env={}, thread=4)


@pytest.mark.parametrize(
    "name,value",
    [("threads", 0), ("threads", "many"), ("bind", "nohost"), ("log_level", "loud"),
     ("adaptive_limit", "magic"), ("header_timeout", -1)],
)
def test_invalid_value_is_named(name, value):
    with pytest.raises(ConfigError, match=name):
        Config(_env={}, **{name: value})


def test_environment_then_kwargs():
    env = {"RTSERVE_THREADS": "3", "RTSERVE_BIND": "0.0.0.0:9000"}
    cfg = Config(_env=env, threads=5)
    assert cfg.threads == 5 and cfg.bind == "0.0.0.0:9000"
    with pytest.raises(ConfigError, match="threads"):
        Config(_env={"RTSERVE_THREADS": "x"})


def test_every_setting_has_a_cli_flag():
    parser = build_parser()
    flags = {a for action in parser._actions for a in action.option_strings}
    for s in SETTINGS:
        assert s.flag in flags, s.name
    args = parser.parse_args(["m:app", "--threads", "2", "--keepalive-timeout", "1.5",
                              "--route-deadline", "/a=5", "--route-deadline", "/b=7"])
    assert args.threads == "2" and args.keepalive_timeout == "1.5"
    assert Config(_env={}, route_deadline=args.route_deadline).route_deadline == ["/a=5", "/b=7"]


def test_load_app_forms(tmp_path, monkeypatch):
    (tmp_path / "someapp.py").write_text(
        "def application(environ, start_response):\n    return []\n"
        "def make():\n    return application\n"
        "class ns:\n    inner = application\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod_app = load_app("someapp:application")
    assert callable(mod_app)
    assert load_app("someapp:make()") is mod_app
    assert load_app("someapp:ns.inner") is mod_app


def test_configuration_doc_is_generated_from_the_table():
    import pathlib

    from rtserve.config import settings_markdown

    doc = pathlib.Path(__file__).parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == settings_markdown(), "run: python -m rtserve.config > " + str(doc)


def test_a_wsgi_app_with_a_resolve_method_is_still_wsgi():
    from rtserve import App
    from rtserve.config import Config
    from rtserve.server import as_dispatcher
    from rtserve.wsgi import WSGIApp

    class Router:
        def resolve(self, path):  # an application's own routing helper
            return path

        def __call__(self, environ, start_response):
            start_response("200 OK", [])
            return [b"ok"]

    cfg = Config(_env={})
    assert isinstance(as_dispatcher(Router(), cfg), WSGIApp)
    native = App()
    assert as_dispatcher(native, cfg) is native


# ---- list settings from text: JSON or commas ----------------------------------------------


def test_a_list_from_the_environment_may_be_a_json_list():
    """Items with commas (a JSON fallback body) need JSON; plain text is split on commas."""
    env = {"RTSERVE_FALLBACK": '["/a=200:{\\"x\\":1,\\"y\\":2}", "/b=503:busy, later"]',
           "RTSERVE_ROUTE_DEADLINE": " [ ] "}
    cfg = Config(_env=env)
    assert cfg.fallback == ['/a=200:{"x":1,"y":2}', "/b=503:busy, later"]
    assert cfg.route_deadline == []
    cfg = Config(_env={"RTSERVE_FORWARDED_ALLOW_IPS": "10.0.0.1, [::1],10.0.0.0/8"})
    assert cfg.forwarded_allow_ips == ["10.0.0.1", "[::1]", "10.0.0.0/8"]  # [::1] is no JSON


@pytest.mark.parametrize("text", ['["/a=20", ', '["/a=20", 5]', '["/a=20"] x', '[""'])
def test_a_bad_json_list_is_an_error_that_names_the_setting(text):
    with pytest.raises(ConfigError, match="route_deadline"):
        Config(_env={"RTSERVE_ROUTE_DEADLINE": text})


# ---- the config file --------------------------------------------------------------------------


def write(tmp_path, text: str):
    path = tmp_path / "rtserve.toml"
    path.write_text(text)
    return str(path)


def test_config_file_sits_between_the_environment_and_the_defaults(tmp_path):
    path = write(tmp_path, 'threads = 3\nbacklog = 7\naccess_log = true\n'
                           'route_deadline = ["/a=5", "/b,c=6"]\nheader_timeout = 2.5\n')
    cfg = Config(_env={"RTSERVE_CONFIG": path, "RTSERVE_BACKLOG": "9"}, header_timeout=1)
    assert (cfg.threads, cfg.backlog, cfg.header_timeout) == (3, 9, 1.0)  # file, env, kwarg
    assert cfg.access_log is True and cfg.route_deadline == ["/a=5", "/b,c=6"]
    assert cfg.keepalive_timeout == 5.0  # nobody set it: the default
    assert Config(_env={}, config=path).threads == 3  # the path as a keyword (or --config)


@pytest.mark.parametrize(
    "text, match",
    [
        ("thread = 3\n", "unknown setting 'thread'"),
        ('config = "other.toml"\n', "unknown setting 'config'"),
        ("threads = 1.5\n", "threads"),  # read as the text "1.5", as RTSERVE_THREADS would be
        ('threads = "many"\n', "threads"),
        ("threads = \n", "rtserve.toml"),  # not TOML
    ],
)
def test_a_bad_config_file_is_an_error_that_names_it(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        Config(_env={}, config=path)
    assert "rtserve.toml" in str(info.value)


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no-such.toml"):
        Config(_env={}, config=str(tmp_path / "no-such.toml"))


def test_replace_keeps_the_resolved_values_without_reading_the_file_again(tmp_path):
    path = write(tmp_path, "threads = 3\n")
    cfg = Config(_env={}, config=path)
    (tmp_path / "rtserve.toml").unlink()
    again = cfg.replace(backlog=5)
    assert (again.threads, again.backlog, again.config) == (3, 5, path)
