"""The web console in a real headless browser (Debian's chromium, driven by chromedriver).

Run by tests/tests/console.rs, which starts the system and the console:

    console.py BASE_URL OPERATOR_CREDS SUBMITTER_CREDS ARTIFACT_DIR SCHEDULE_NAME

A submitter's credential is refused at the login. It logs in with the operator's credential and opens the jobs page, prints READY, and reads
a job id from stdin (the Rust side submits that job through the CLI). Without reloading the
page it must see the job's row go from Pending to Succeeded; then the job's page must show
its logs, its explanation and its timeline; then it pauses the schedule from the schedules
page and discards a dead letter from the dead letters' page. Screenshots go to ARTIFACT_DIR. It prints OK when everything held (and keeps the
jobs page open until a line on stdin, while the console is stopped); any failure is an
exception (exit status 1) that says what was seen.
"""

import os
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def wait(what, check, limit=60.0):
    deadline = time.time() + limit
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as error:  # the page is being replaced: look again
            last = error
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def main():
    base, creds, submitter, artifacts, schedule = sys.argv[1:6]
    os.makedirs(artifacts, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ["HODEI_CHROMIUM"]
    profile = tempfile.mkdtemp(prefix="hodei-console-browser-")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,2400", "--no-first-run",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        service=Service(executable_path=os.environ["HODEI_CHROMEDRIVER"]), options=options)

    def following():
        return driver.execute_script("return document.body.dataset.live === 'open'")
    try:
        # Not logged in: the console sends us to its login page.
        driver.get(base + "/jobs")
        wait("the login page", lambda: driver.current_url.endswith("/login"))
        with open(submitter) as f:
            submitter_creds = f.read()
        driver.find_element(By.NAME, "creds").send_keys(submitter_creds)
        driver.find_element(By.ID, "login").click()
        refusal = wait("the submitter refused", lambda: driver.find_elements(By.CSS_SELECTOR, ".error")
                       and driver.find_element(By.CSS_SELECTOR, ".error").text)
        assert "not an operator" in refusal, refusal
        seed = [line for line in submitter_creds.splitlines() if line.startswith("SU")][0]
        assert seed not in driver.page_source, "the pasted seed is not echoed back"
        with open(creds) as f:
            driver.find_element(By.NAME, "creds").send_keys(f.read())
        driver.find_element(By.ID, "login").click()
        wait("the jobs page", lambda: driver.current_url.endswith("/jobs")
             and driver.find_elements(By.ID, "job-rows"))
        # The page follows the job events before the job exists.
        wait("the live updates", following)
        print("READY", flush=True)

        job_id = sys.stdin.readline().strip()
        row = f'tr[data-job="{job_id}"]'
        seen = []

        def state_of_row():
            cells = driver.find_elements(By.CSS_SELECTOR, row + " td.state")
            if cells:
                state = cells[0].text
                if not seen or seen[-1] != state:
                    seen.append(state)
            return seen and seen[-1] == "Succeeded"

        wait("the job's row to reach Succeeded", state_of_row)
        assert seen[0] == "Pending", f"the row was first {seen}"
        print(f"states seen live: {seen}", flush=True)
        # What the submitter wrote is shown as text, never run.
        label = driver.find_element(By.CSS_SELECTOR, row + " .label").text
        assert "<img" in label, label
        assert driver.execute_script("return window.pwned === undefined"), "markup ran"

        driver.find_element(By.CSS_SELECTOR, row + " a").click()
        wait("the job's page", lambda: driver.find_elements(By.ID, "logs"))
        logs = wait("the job's logs", lambda: "console-sees-this" in driver.find_element(
            By.ID, "logs").text and driver.find_element(By.ID, "logs").text)
        assert "<b>not bold</b>" in logs, logs
        assert not driver.find_elements(By.CSS_SELECTOR, "#logs b"), "a log line became markup"
        wait("the job's state", lambda: driver.find_element(By.ID, "job-state").text == "Succeeded")
        # The page is rendered again as the job's events arrive: an element found just before
        # may be gone when read, so each read is made in `wait`, which looks again.
        why = wait("the job's reason", lambda: driver.find_element(By.ID, "job-why").text)
        assert why.startswith("succeeded at"), why

        def whole_timeline():
            text = driver.find_element(By.ID, "timeline").text
            return all(e in text for e in ("JobCreated", "JobQueued", "JobCompleted")) and text

        wait("the job's timeline with its events", whole_timeline)
        driver.save_screenshot(os.path.join(artifacts, "console-job.png"))

        driver.get(base + "/schedules")
        schedule_row = f'tr[data-schedule="{schedule}"]'
        wait("the schedule", lambda: driver.find_elements(By.CSS_SELECTOR, schedule_row))
        driver.find_element(By.CSS_SELECTOR, schedule_row + " button.pause").click()
        wait("the schedule paused", lambda: driver.find_element(
            By.CSS_SELECTOR, schedule_row + " td.state").text == "Paused")
        driver.save_screenshot(os.path.join(artifacts, "console-schedules.png"))

        # Dead letters: the Rust side made some; discard the first from its page.
        driver.get(base + "/dlq")
        rows = wait("the dead letters", lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-seq]"))
        before = len(rows)
        seq = rows[0].get_attribute("data-seq")
        rows[0].find_element(By.XPATH, ".//form[contains(@action, '/discard')]//button").click()
        wait("the dead letter gone", lambda: driver.current_url.endswith("/dlq") and not
             driver.find_elements(By.CSS_SELECTOR, f'tr[data-seq="{seq}"]'))
        after = len(driver.find_elements(By.CSS_SELECTOR, "tr[data-seq]"))
        assert after == before - 1, (before, after)
        print(f"discarded dead letter {seq}", flush=True)

        # Back on a live page (its event stream open) while the console is stopped.
        driver.get(base + "/jobs")
        wait("the jobs page following its events", following)
        print("OK", flush=True)
        sys.stdin.readline()
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
