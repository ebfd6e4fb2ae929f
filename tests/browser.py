"""Headless Chromium for page tests (Debian's chromium + chromium-driver, driven by Selenium)."""

import os
import shutil

from conftest import missing

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = os.environ.get("TRANSFERKIT_TEST_ARTIFACTS", os.path.join(os.path.dirname(__file__), "..", "test-artifacts"))


def chromium():
    """A headless Chromium WebDriver. Where Chromium or chromedriver is not installed: a skip with the reason,
    except under CI=true, where the page tests must run, so it is a failure."""
    if not (CHROMIUM and CHROMEDRIVER):
        absent = " and ".join(name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
                              if not path)
        missing(f"{absent} not installed (apt-get install chromium chromium-driver): the page tests need it")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,2000"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def save_screenshot(driver, name: str) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    driver.save_screenshot(path)
    return path
