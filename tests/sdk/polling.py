"""What the SDK test scripts share: waiting for a background response to finish."""

import time


def wait_done(client, response_id, timeout=30):
    """Retrieves the response until it is neither queued nor in progress."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        assert time.monotonic() < deadline, f"{response_id} still {response.status}"
        time.sleep(0.05)
