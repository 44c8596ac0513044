"""The security officers' page in a real headless Chromium, against a real server.

SoftHSM and SQLite behind a real uvicorn server; Debian's chromium and chromedriver drive the
page as an officer would: sign in with a private key file (signed in the browser with
WebCrypto), read the dashboard, open a review campaign and certify and revoke in its worklist,
look up an audit record and check its inclusion proof in the browser, and see the key-use
chart. Each result is then checked through the API too. One browser session serves the module,
so the tests run in file order and build on each other.
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import hvac
import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from api.routes_web import SECURITY_HEADERS
from api.runtime import create_runtime, prepare_hsm
from tests.conftest import ServerThread, make_settings
from tests.integration.test_access import AUDIENCE, Party, World

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BROWSER_INTERNAL = {"chrome", "chrome-untrusted", "devtools", "about", "data", "blob"}


@dataclass
class Notes:
    """What one test leaves for a later one in the shared browser session."""

    downloads: Path
    tokens: list[str] = field(default_factory=list)  # every token the page held
    campaign: str = ""


@dataclass
class Officers(World):
    """``World`` with a second security officer, who may decide the first one's review."""

    second: Party


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Officers]:
    """An initialised, unsealed embassy site with two security officers and some key use."""
    settings = make_settings(
        tmp_path_factory.mktemp("ekms"), site_name="embassy-1", site_kind="embassy"
    )
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    with ServerThread(runtime) as server:
        vault = hvac.Client(url=server.url)
        result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
        for share in result["keys"][:2]:
            vault.sys.submit_unseal_key(share)
        root = result["root_token"]
        world = Officers(
            server,
            root,
            [Party.ec(f"official-{n}") for n in range(2)],
            Party.ec("officer-1"),
            Party.ec("operator"),
            Party.ed("restore-tool"),
            Party.ec("officer-2"),
        )
        for party, role in (
            (world.officer, "security-officer"),
            (world.second, "security-officer"),
            *((official, "official") for official in world.officials),
            (world.operator, "restore-operator"),
            (world.tool, "restore-tool"),
        ):
            world.call(
                "POST",
                f"ekms/principals/{party.id}",
                root,
                body={"roles": [role], "jwk": party.jwk},
            ).raise_for_status()
        plaintext = base64.b64encode(b"land register").decode()
        world.call(
            "POST", "transit/keys/laws", root, body={"classification": "internal"}
        ).raise_for_status()
        for _ in range(3):
            world.call(
                "POST",
                "transit/encrypt/laws",
                root,
                body={"plaintext": plaintext, "context": "Y3R4"},
            ).raise_for_status()
        refused = world.call(
            "POST",
            "transit/encrypt/laws",
            world.login(world.operator),
            body={"plaintext": plaintext, "context": "Y3R4"},
        )
        assert refused.status_code == 403, refused.text
        yield world
    runtime.close()


@pytest.fixture(scope="module")
def notes(tmp_path_factory: pytest.TempPathFactory) -> Notes:
    return Notes(tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, notes: Notes) -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "Chromium and chromedriver are not installed (/usr/bin/chromium, "
            "/usr/bin/chromedriver): run `make test`, which installs them"
        )
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(notes.downloads), "download.prompt_for_download": False},
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --- helpers ---------------------------------------------------------------------------------


def by_testid(name: str) -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{name}"]'


def until(
    driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], what: str, timeout=10
) -> Any:
    try:
        return WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.05,
            ignored_exceptions=(StaleElementReferenceException,),  # the page re-rendered meanwhile
        ).until(condition)
    except TimeoutException:
        message = driver.find_element(By.ID, "message")
        problem = message.text if message.is_displayed() else "no message shown"
        pytest.fail(f"timed out waiting for {what}; the page says: {problem}")


def visible(driver: webdriver.Chrome, name: str, what: str | None = None) -> WebElement:
    def find(d: webdriver.Chrome) -> WebElement | bool:
        found = d.find_elements(*by_testid(name))
        return found[0] if found and found[0].is_displayed() else False

    return until(driver, find, what or name)


def text_is(driver: webdriver.Chrome, name: str, expected: str) -> None:
    def check(d: webdriver.Chrome) -> bool:
        found = d.find_elements(*by_testid(name))
        return bool(found) and found[0].text == expected

    until(driver, check, f"{name} to read {expected!r}")


def go(driver: webdriver.Chrome, fragment: str) -> None:
    driver.execute_script("window.location.hash = arguments[0]", fragment)


def session_token(driver: webdriver.Chrome, notes: Notes) -> str:
    saved = driver.execute_script("return sessionStorage.getItem('ekms.session')")
    assert saved, "no session in sessionStorage"
    token = str(json.loads(saved)["token"])
    notes.tokens.append(token)
    return token


def page_requests(driver: webdriver.Chrome) -> list[str]:
    """URLs the page asked for since the last call, from Chromium's DevTools log."""
    urls = []
    for entry in driver.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event["method"] == "Network.requestWillBeSent":
            urls.append(event["params"]["request"]["url"])
    return urls


def console_problems(driver: webdriver.Chrome, expected: tuple[str, ...] = ()) -> list[str]:
    """Console errors since the last call, less the failed requests a step provoked on purpose."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] in {"SEVERE", "WARNING"}
        and not any(text in entry["message"] for text in expected)
    ]


@pytest.fixture(scope="module")
def key_files(world: Officers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    jwk = folder / "officer-1.jwk.json"
    jwk.write_text(json.dumps(world.officer.private_jwk()))
    pem = folder / "officer-1.pem"
    pem.write_bytes(world.officer.private_pem())
    jwk.chmod(0o600)
    pem.chmod(0o600)
    return {"jwk": jwk, "pem": pem}


def sign_in_with_key(driver: webdriver.Chrome, principal: str, key_file: Path) -> None:
    visible(driver, "view-signin")
    field = driver.find_element(By.ID, "signin-principal")
    field.clear()
    field.send_keys(principal)
    driver.find_element(By.ID, "signin-keyfile").send_keys(str(key_file))
    driver.find_element(*by_testid("signin-key")).click()


# --- the tests, in the order an officer works ------------------------------------------------


def test_page_is_served_with_strict_headers(world: Officers) -> None:
    base = world.server.url
    page = requests.get(f"{base}/ui/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text
    assert " style=" not in page.text
    assert f'content="{AUDIENCE}"' in page.text
    for asset, media in (("app.js", "text/javascript"), ("app.css", "text/css")):
        answer = requests.get(f"{base}/ui/{asset}", timeout=10)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith(media)
        assert answer.headers["x-content-type-options"] == "nosniff"
    bare = requests.get(f"{base}/ui", allow_redirects=False, timeout=10)
    assert bare.status_code == 308
    assert bare.headers["location"] == "/ui/"
    missing = requests.get(f"{base}/ui/routes_web.py", timeout=10)  # only the page's own files
    assert missing.status_code == 404
    assert missing.json() == {"errors": ["the page has no file 'routes_web.py'"]}
    assert missing.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    for name in ("..%2Fapp.py", "%2e%2e/app.py", "web%2Fapp.js"):
        assert requests.get(f"{base}/ui/{name}", timeout=10).status_code == 404, name


def test_sign_in_with_a_key_file(
    world: Officers, browser: webdriver.Chrome, key_files: dict[str, Path], notes: Notes
) -> None:
    browser.get(f"{world.server.url}/ui/")
    until(browser, lambda d: d.execute_script("return document.body.dataset.ready"), "the page")

    # A key the service does not hold for that principal: the service's own message is shown.
    sign_in_with_key(browser, "officer-2", key_files["pem"])
    message = visible(browser, "message", "the login error")
    assert message.text == "401: authentication failed"  # opaque, as for any client
    assert console_problems(browser, expected=("status of 401",)) == []

    sign_in_with_key(browser, world.officer.id, key_files["jwk"])
    text_is(browser, "who", world.officer.id)
    visible(browser, "view-dashboard")
    assert browser.find_element(By.ID, "who-roles").text == "security-officer"
    token = session_token(browser, notes)
    assert token not in browser.current_url
    assert browser.get_cookies() == []
    assert browser.execute_script("return window.localStorage.length") == 0

    lookup = world.call("GET", "auth/token/lookup-self", token).json()["data"]
    assert lookup["entity_id"] == world.officer.id

    browser.refresh()  # sessionStorage keeps the session for this tab
    text_is(browser, "who", world.officer.id)


def test_dashboard_shows_the_report_and_downloads_csv(
    world: Officers, browser: webdriver.Chrome, notes: Notes
) -> None:
    go(browser, "#/dashboard")
    visible(browser, "table-principals", "the principals table")
    rows = browser.find_elements(By.CSS_SELECTOR, '[data-testid="table-principals"] tbody tr')
    ids = {row.find_element(By.CSS_SELECTOR, "td").text for row in rows}
    assert {"officer-1", "officer-2", "operator", "restore-tool"} <= ids
    assert int(browser.find_element(*by_testid("count-principals")).text.split()[0]) == len(rows)

    browser.find_element(*by_testid("csv-principals")).click()
    target = notes.downloads / "ekms-review-principals.csv"
    until(browser, lambda _d: target.exists() and target.stat().st_size > 0, "the CSV download")
    assert target.read_text().splitlines()[0].startswith("id,display_name,roles")


def test_campaign_worklist_certify_and_own_row(
    world: Officers, browser: webdriver.Chrome, notes: Notes
) -> None:
    go(browser, "#/campaigns")
    visible(browser, "view-campaigns")
    duration = browser.find_element(By.ID, "campaign-duration")
    duration.clear()
    duration.send_keys("10m")  # shorter than a campaign may be: the service's message is shown
    browser.find_element(*by_testid("campaign-open")).click()
    refused = visible(browser, "message", "the refusal")
    assert refused.text == "400: duration must be between 3600 and 7776000 seconds"
    assert console_problems(browser, expected=("status of 400",)) == []

    duration.clear()
    duration.send_keys("24h")
    browser.find_element(*by_testid("campaign-open")).click()
    campaign_id = visible(browser, "campaign-id", "the new campaign").text
    assert campaign_id

    own = visible(browser, f"certify-{world.officer.id}", "officer-1's own row")
    assert not own.is_enabled()
    assert not browser.find_element(*by_testid(f"revoke-{world.officer.id}")).is_enabled()
    assert "another officer" in browser.find_element(*by_testid(f"own-row-{world.officer.id}")).text

    browser.find_element(*by_testid(f"certify-{world.operator.id}")).click()
    text_is(browser, f"item-state-{world.operator.id}", "certified")
    text_is(browser, f"item-decided-by-{world.operator.id}", world.officer.id)
    assert "Certified operator" in visible(browser, "notice").text

    second = world.login(world.second)
    answer = world.call("GET", f"ekms/review/campaigns/{campaign_id}", second)
    assert answer.status_code == 200, answer.text
    item = answer.json()["data"]["campaign"]["items"][world.operator.id]
    assert item["state"] == "certified"
    assert item["decided_by"] == world.officer.id
    assert answer.json()["data"]["campaign"]["items"][world.officer.id]["state"] == "pending"

    # Closing asks first, naming who would be suspended; cancelled here.
    browser.find_element(*by_testid("campaign-close")).click()
    suspend = visible(browser, "close-suspend", "the close confirmation").text
    assert world.officer.id in suspend
    assert world.operator.id not in suspend
    browser.find_element(By.ID, "close-cancel").click()
    listed = world.call("GET", f"ekms/review/campaigns/{campaign_id}", second).json()
    assert listed["data"]["campaign"]["state"] == "open"
    notes.campaign = campaign_id


def test_revoke_needs_a_note_and_close_reports_the_outcome(
    world: Officers, browser: webdriver.Chrome
) -> None:
    second = world.login(world.second)
    opened = world.call(
        "POST",
        "ekms/review/campaigns",
        second,
        body={"duration": "2h", "scope": [world.operator.id, world.tool.id]},
    )
    assert opened.status_code == 200, opened.text
    data = opened.json()["data"]
    campaign_id = data.get("id") or data["campaign"]["id"]

    go(browser, f"#/campaigns/{campaign_id}")
    text_is(browser, "campaign-id", campaign_id)
    browser.find_element(*by_testid(f"certify-{world.operator.id}")).click()
    text_is(browser, f"item-state-{world.operator.id}", "certified")

    visible(browser, f"revoke-{world.tool.id}").click()
    visible(browser, "revoke-dialog")
    browser.find_element(By.ID, "revoke-note").send_keys("tool retired with the old backup site")
    browser.find_element(*by_testid("revoke-confirm")).click()
    text_is(browser, f"item-state-{world.tool.id}", "revoked")

    browser.find_element(*by_testid("campaign-close")).click()
    assert "nobody" in visible(browser, "close-suspend").text
    assert world.tool.id in browser.find_element(*by_testid("close-revoke")).text
    browser.find_element(*by_testid("close-confirm")).click()
    until(
        browser,
        lambda d: "Closed campaign" in d.find_element(*by_testid("notice")).text,
        "the close notice",
    )
    assert f"Revoked: {world.tool.id}" in browser.find_element(*by_testid("notice")).text
    campaign = world.call("GET", f"ekms/review/campaigns/{campaign_id}", second).json()["data"]
    assert campaign["campaign"]["state"] == "closed"
    assert campaign["campaign"]["items"][world.tool.id]["note"].startswith("tool retired")


def test_audit_record_proof_verifies_in_the_browser(
    world: Officers, browser: webdriver.Chrome, notes: Notes
) -> None:
    go(browser, "#/audit")
    operation = visible(browser, "view-audit") and browser.find_element(By.ID, "audit-operation")
    operation.clear()
    operation.send_keys("transit.*")
    browser.find_element(*by_testid("audit-search")).click()
    until(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid^="audit-row-"]'),
        "audit records",
    )
    operations = [
        row.find_elements(By.CSS_SELECTOR, "td")[3].text
        for row in browser.find_elements(By.CSS_SELECTOR, '[data-testid="table-audit"] tbody tr')
    ]
    assert operations
    assert all(op.startswith("transit.") for op in operations)
    assert "transit.encrypt" in operations

    browser.find_elements(By.CSS_SELECTOR, '[data-testid^="audit-row-"]')[0].click()
    status = visible(browser, "audit-proof-status")
    until(browser, lambda _d: status.get_attribute("data-result") != "pending", "the proof check")
    if status.get_attribute("data-result") == "uncovered":  # newer than the newest signed head
        browser.find_element(*by_testid("audit-sign-head")).click()
    until(
        browser,
        lambda _d: status.get_attribute("data-result") == "verified",
        "the proof to verify",
    )
    heads = world.call("GET", "ekms/audit/heads", session_token(browser, notes)).json()["data"][
        "heads"
    ]
    newest = max(head["size"] for head in heads)
    assert f"Verified against signed tree head of size {newest}" in status.text
    record = json.loads(browser.find_element(*by_testid("audit-record-json")).text)
    assert record["operation"].startswith("transit.")


def test_key_use_chart(world: Officers, browser: webdriver.Chrome, notes: Notes) -> None:
    go(browser, "#/usage")
    chart = visible(browser, "usage-chart-laws", "the chart for key laws")
    bars = chart.find_elements(By.CSS_SELECTOR, "g.bar")
    assert bars
    allowed = sum(
        float(rect.get_attribute("height"))
        for rect in chart.find_elements(By.CSS_SELECTOR, "rect.bar-allowed")
    )
    assert allowed > 0
    usage = world.call("GET", "ekms/audit/usage?key=laws", session_token(browser, notes)).json()[
        "data"
    ]
    (series,) = usage["series"]
    allowed_total = sum(point[1] for point in series["points"])
    denied_total = sum(point[2] for point in series["points"])
    assert allowed_total >= 3  # the three encryptions, and the key's creation
    legend = browser.find_element(By.CSS_SELECTOR, '[data-testid="usage-laws"] .legend').text
    assert legend == f"allowed {allowed_total} denied {denied_total}"


def test_pasted_token_and_sign_out(
    world: Officers, browser: webdriver.Chrome, notes: Notes
) -> None:
    page_token = session_token(browser, notes)
    browser.find_element(*by_testid("sign-out")).click()
    visible(browser, "view-signin")
    assert browser.execute_script("return sessionStorage.length") == 0
    assert browser.find_element(By.ID, "report-sections").text == ""
    # The page's own token was revoked at the service, not just forgotten.
    assert world.call("GET", "auth/token/lookup-self", page_token).status_code in {401, 403}

    second = world.second
    browser.find_element(By.ID, "signin-token").send_keys(world.login(second))
    browser.find_element(*by_testid("signin-token")).click()
    text_is(browser, "who", second.id)
    assert session_token(browser, notes)
    # The second officer may decide the first officer's own row.
    go(browser, f"#/campaigns/{notes.campaign}")
    visible(browser, f"certify-{world.officer.id}").click()
    text_is(browser, f"item-state-{world.officer.id}", "certified")
    text_is(browser, f"item-decided-by-{world.officer.id}", second.id)


def test_no_script_errors_and_nothing_fetched_from_elsewhere(
    browser: webdriver.Chrome, notes: Notes
) -> None:
    assert console_problems(browser) == []
    urls = page_requests(browser)
    assert any(url.endswith("/ui/app.js") for url in urls)
    # Whatever asked (the page, or Chromium's own new-tab page before it), nothing that could
    # leave the machine went anywhere but the loopback test server.
    network = [url for url in urls if urlsplit(url).scheme not in BROWSER_INTERNAL]
    assert all(urlsplit(url).scheme in {"http", "https", "ws", "wss"} for url in network), network
    assert [url for url in network if urlsplit(url).hostname not in LOOPBACK] == []
    assert notes.tokens
    assert not any(token in url for url in urls for token in notes.tokens)
