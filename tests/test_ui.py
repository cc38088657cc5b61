"""The dashboard's files and its trigger-in-words module, without a browser.

``words.mjs`` is plain JavaScript with no DOM: it runs here under Node (which the test suite already
needs for Azurite). The page itself is tested in Chromium in test_ui_browser.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from routines import ui

ROOT = Path(__file__).resolve().parent.parent
WORDS = Path(ui.__file__).parent / "static" / "words.mjs"
NODE = shutil.which("node")


def in_words(triggers: list[dict[str, object]]) -> list[str]:
    if NODE is None:
        pytest.skip("node is not installed")
    script = (
        f"import {{ triggerInWords }} from {json.dumps(WORDS.as_uri())};\n"
        f"console.log(JSON.stringify({json.dumps(triggers)}.map(triggerInWords)));"
    )
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60, check=True
    )
    return list(json.loads(done.stdout))


def schedule(cron: str, tz: str = "UTC") -> dict[str, object]:
    return {"type": "schedule", "cron_expression": cron, "time_zone": tz}


CASES: list[tuple[str, dict[str, object], str]] = [
    ("daily", schedule("0 6 * * *", "Europe/Paris"), "every day at 06:00, Europe/Paris"),
    ("weekdays", schedule("30 8 * * 1-5"), "every weekday at 08:30, UTC"),
    ("day_name", schedule("0 9 * * MON"), "every Monday at 09:00, UTC"),
    ("day_list", schedule("0 9 * * 1,3,5"), "every Monday, Wednesday and Friday at 09:00, UTC"),
    ("sunday_as_7", schedule("0 0 * * 7"), "every Sunday at 00:00, UTC"),
    ("weekend", schedule("0 12 * * 6,0"), "every Saturday and Sunday at 12:00, UTC"),
    ("day_range", schedule("0 9 * * TUE-THU"), "every Tuesday to Thursday at 09:00, UTC"),
    ("two_times", schedule("0 6,18 * * *"), "every day at 06:00 and 18:00, UTC"),
    ("every_minute", schedule("* * * * *"), "every minute, UTC"),
    ("every_5_minutes", schedule("*/5 * * * *"), "every 5 minutes, UTC"),
    ("hourly", schedule("0 * * * *"), "every hour, UTC"),
    ("hourly_at_15", schedule("15 * * * *"), "every hour at minute 15, UTC"),
    ("half_hours", schedule("0,30 * * * *"), "every hour at minutes 0 and 30, UTC"),
    ("every_2_hours", schedule("0 */2 * * *"), "every 2 hours, UTC"),
    ("hour_step_window", schedule("0 8-18/2 * * *"), "every 2 hours, from 08:00 to 18:00, UTC"),
    (
        "office_hours",
        schedule("*/15 9-17 * * 1-5", "America/New_York"),
        "every 15 minutes, from 09:00 to 17:59, every weekday, America/New_York",
    ),
    ("monthly", schedule("0 0 1 * *"), "on the 1st of every month at 00:00, UTC"),
    ("twice_monthly", schedule("0 0 1,15 * *"), "on the 1st and 15th of every month at 00:00, UTC"),
    (
        "ordinals",
        schedule("0 6 2-3,11,22,23 * *"),
        "on the 2nd, 3rd, 11th, 22nd and 23rd of every month at 06:00, UTC",
    ),
    ("yearly", schedule("0 7 1 JAN *"), "on the 1st of January at 07:00, UTC"),
    ("summer", schedule("0 6 * 6-8 *"), "every day in June to August at 06:00, UTC"),
    ("seconds_field", schedule("30 0 6 * * *"), "every day at 06:00:30, UTC"),
    ("zero_seconds", schedule("0 0 6 * * *"), "every day at 06:00, UTC"),
    ("every_10_seconds", schedule("*/10 * * * * *"), "every 10 seconds, UTC"),
    ("every_second", schedule("* * * * * *"), "every second, UTC"),
    ("macro_daily", schedule("@daily"), "every day at 00:00, UTC"),
    ("macro_weekly", schedule("@weekly"), "every Sunday at 00:00, UTC"),
    ("macro_yearly", schedule("@yearly"), "on the 1st of January at 00:00, UTC"),
    ("default_zone", {"type": "schedule", "cron_expression": "0 6 * * *"}, "every day at 06:00, UTC"),
    # What words would get wrong is shown as the expression itself.
    ("day_or_weekday", schedule("0 6 1 * 1"), "cron 0 6 1 * 1, UTC"),
    ("last_day", schedule("5 4 L * *"), "cron 5 4 L * *, UTC"),
    ("weekday_step", schedule("0 6 * * */2"), "cron 0 6 * * */2, UTC"),
    ("many_times", schedule("0,10,20,30 6,7 * * *"), "cron 0,10,20,30 6,7 * * *, UTC"),
    ("out_of_range", schedule("0 25 * * *"), "cron 0 25 * * *, UTC"),
    ("seconds_in_window", schedule("*/10 * 9 * * *"), "cron */10 * 9 * * *, UTC"),
    ("timer", {"type": "timer", "at": "2026-09-30T23:59:00Z"}, "once at 2026-09-30 23:59 UTC"),
    ("timer_offset", {"type": "timer", "at": "2026-09-30T12:00:30+02:00"}, "once at 2026-09-30 10:00:30 UTC"),
    (
        "webhook",
        {"type": "webhook", "signature": "github", "secret_setting": "HOOK"},
        "on each webhook delivery (github)",
    ),
]


def test_triggers_in_words() -> None:
    # One Node process for the whole table; the ids make a failure readable.
    expected = {case_id: words for case_id, _, words in CASES}
    got = dict(zip(expected, in_words([trigger for _, trigger, _ in CASES]), strict=True))
    assert {k: v for k, v in got.items() if v != expected[k]} == {}


PAGE_URL = "http://127.0.0.1:7071/api/ui"


@pytest.mark.parametrize(
    ("url", "base"),
    [
        pytest.param("http://127.0.0.1:7071/api/ui", "/api/ui/", id="no_slash"),
        pytest.param("http://127.0.0.1:7071/api/ui/", "/api/ui/", id="slash"),
        pytest.param("https://app.example.net/api/ui/index.html?code=x", "/api/ui/", id="index_file"),
        pytest.param("https://app.example.net/custom/prefix/ui", "/custom/prefix/ui/", id="route_prefix"),
    ],
)
def test_page_points_its_base_at_the_ui_folder(url: str, base: str) -> None:
    asset = ui.serve("", url)
    assert asset.status == 200 and asset.content_type == "text/html"
    assert f'<base href="{base}">'.encode() in asset.body
    assert b"{{base}}" not in asset.body


def test_assets_have_their_types_and_a_same_origin_policy() -> None:
    for name, content_type in [
        ("app.mjs", "text/javascript"),
        ("words.mjs", "text/javascript"),
        ("style.css", "text/css"),
    ]:
        asset = ui.serve(name, f"{PAGE_URL}/{name}")
        assert (asset.status, asset.content_type) == (200, content_type), name
        assert asset.body == (WORDS.parent / name).read_bytes()
        policy = asset.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy
        assert asset.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    ["nothing.js", "../__init__.py", "static/app.mjs", "%2e%2e/__init__.py", "app.mjs/x", "__init__.py"],
)
def test_unknown_files_are_404_problems(path: str) -> None:
    asset = ui.serve(path, f"{PAGE_URL}/{path}")
    assert (asset.status, asset.content_type) == (404, "application/problem+json")
    assert json.loads(asset.body)["status"] == 404


def test_an_unchanged_file_is_304() -> None:
    first = ui.serve("app.mjs", f"{PAGE_URL}/app.mjs")
    etag = first.headers["ETag"]
    again = ui.serve("app.mjs", f"{PAGE_URL}/app.mjs", f'"other", {etag}')
    assert (again.status, again.body, again.headers["ETag"]) == (304, b"", etag)
    assert ui.serve("app.mjs", f"{PAGE_URL}/app.mjs", '"other"').status == 200


def test_the_page_loads_nothing_from_other_hosts() -> None:
    # No build step and no CDN: every file the page refers to is one of the package's own.
    static = WORDS.parent
    for path in static.iterdir():
        text = path.read_text(encoding="utf-8").replace('"http://www.w3.org/', '"namespace:')  # XML names
        assert "http://" not in text and "https://" not in text and '"//' not in text, path.name


def test_the_page_is_anonymous_and_the_api_it_calls_is_not() -> None:
    # Loaded afresh by path: other tests (the devhost's) put their own apps under "function_app".
    spec = importlib.util.spec_from_file_location("routines_function_app", ROOT / "function_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    levels = {}
    for function in module.app.get_functions():
        trigger = function.get_trigger().get_dict_repr()
        if trigger["type"] == "httpTrigger":
            levels[trigger["route"]] = str(
                getattr(trigger["authLevel"], "value", trigger["authLevel"])
            ).lower()
    assert levels.pop("ui/{*path}") == "anonymous"
    assert {route: level for route, level in levels.items() if route.startswith(("routines", "preview"))} == {
        route: "function" for route in levels if route.startswith(("routines", "preview"))
    }
