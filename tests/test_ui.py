"""
Tests of ui.html, the chat page, in a real headless browser: Debian's chromium and
chromium-driver (apt) driven by selenium (pip), test-only extras that .ci/run installs. Without
them the test skips, except under CI (the CI environment variable set), where it fails.

The page talks to a serve.Server in a thread (fixtures.running) whose fake model types an answer
holding HTML, so the test sees what the page does with markup that comes from the model side.
One browser session does every check: starting Chromium costs seconds.
"""
import shutil

import serve
from tests.fixtures import TypistModel, missing_extra, running

XSS = "<img src=x onerror=alert(1)>"  # what a model may write; the page must show it as text


def _browser():
    """Headless Chromium driven by selenium; a skip (a failure under CI) when either is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_extra("selenium (pip install selenium)")
    names = ("chromium", "chromium-browser", "google-chrome")
    chromium = next((shutil.which(name) for name in names if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        missing_extra("Chromium (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)  # --no-sandbox: as root, Chromium refuses to start without it
    return webdriver.Chrome(service=Service(driver), options=options)


def _assert_markup_shown_as_text(browser):
    """The model's answer carrying XSS shows as text: no <img> element made, no onerror run."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    assert XSS in browser.find_element(By.ID, "chat").text, "the model's markup is not text"
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat img"), "text became an <img>"
    try:
        browser.switch_to.alert
        raise AssertionError("the model's onerror ran")
    except NoAlertPresentException:
        pass


def test_ui_chat_page_in_a_browser():
    """Send (Enter; Shift+Enter is a newline), streamed text, Stop stops the server, Regenerate,
    Edit; model HTML shows as text; busy, too long and lost connection each get a message."""
    browser = _browser()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    answer = f"Here is {XSS} for you. " * 3
    model = TypistModel(answer, is_gated=True)
    try:
        with running(model) as (server, log):
            wait = WebDriverWait(browser, 60)

            def texts(role):  # the messages' text, read in one step: the page redraws at any time
                return browser.execute_script(f"return [...document.querySelectorAll('.msg.{role} "
                                              f".text')].map(e => e.textContent)")

            def shown():  # the last answer on the page
                return (texts("assistant") or [""])[-1]

            def status():
                return browser.find_element(By.ID, "status").text

            browser.get(f"http://localhost:{server.server_address[1]}/")  # the seed's address
            wait.until(lambda b: "sft model" in b.find_element(By.ID, "model").text)
            box = browser.find_element(By.ID, "input")
            box.send_keys("first line")
            shift_enter = ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER)
            shift_enter.key_up(Keys.SHIFT).perform()
            box.send_keys("second line")
            lines = "first line\nsecond line"
            assert box.get_attribute("value") == lines, "Shift+Enter must be a newline"
            assert not texts("user"), "Shift+Enter sent the message"
            box.send_keys(Keys.ENTER)
            # streamed text shows while the answer is unfinished; Stop ends the generation
            model.permits.release(12)  # 12 calls: 12 tokens, then the model waits
            wait.until(lambda b: len(shown()) >= 12)
            assert browser.find_element(By.ID, "stop").is_displayed(), "no Stop while writing"
            browser.find_element(By.ID, "stop").click()
            wait.until(lambda b: b.find_element(By.ID, "regenerate").is_displayed())
            model.permits.release(1000)  # at its next token the server finds the client gone
            log.wait_for("finish_reason disconnect")
            assert shown() == answer[:12], f"after Stop the page shows {shown()!r}"
            # Regenerate: the whole answer, its markup as text
            model.permits = None
            regenerate = browser.find_element(By.ID, "regenerate")
            regenerate.click()
            wait.until(lambda b: shown() == answer and regenerate.is_displayed())
            _assert_markup_shown_as_text(browser)
            # Edit an earlier message: it is replaced and what came after it is dropped
            browser.find_element(By.CSS_SELECTOR, ".msg.user .edit").click()
            assert box.get_attribute("value") == lines, "Edit did not load the message"
            box.clear()
            box.send_keys("edited", Keys.ENTER)
            wait.until(lambda b: b.find_element(By.ID, "regenerate").is_displayed())
            assert texts("user") == ["edited"] and shown() == answer, f"Edit: {texts('user')}"
            # refusals: a message longer than the context, a busy server, a server that is gone
            box.send_keys("x" * 600, Keys.ENTER)
            wait.until(lambda b: "no longer fits" in status())
            assert box.get_attribute("value") == "x" * 600, "a refused message goes back to the box"
            for _ in range(1 + serve.MAX_WAITING):  # stand in for one writing and those waiting
                server.slots.acquire()
            box.clear()
            box.send_keys("hi", Keys.ENTER)
            wait.until(lambda b: "busy" in status())
            for _ in range(1 + serve.MAX_WAITING):
                server.slots.release()
            server.shutdown()
            server.server_close()
            box.send_keys(Keys.ENTER)
            wait.until(lambda b: "connection to the server was lost" in status())
    finally:
        browser.quit()
