"""A webhook receiver for tollgate: the Python standard library's HTTP server, and the official
OpenAI SDK to check each delivery's signature (tollgate signs as OpenAI does).

    pip install openai
    OPENAI_WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py 8000

The secret is the one `tollgate webhooks add` printed. Each verified event is answered 200 and
printed as one JSON line; a delivery whose signature does not match is answered 400.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from openai import InvalidWebhookSignatureError, OpenAI

# The client only checks webhooks here, so it needs no real API key.
client = OpenAI(api_key="unused", webhook_secret=os.environ["OPENAI_WEBHOOK_SECRET"])


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            # Checks webhook-signature against the body, webhook-id and webhook-timestamp (which
            # must be within 5 minutes of now), then parses the event.
            event = client.webhooks.unwrap(body, dict(self.headers))
        except (InvalidWebhookSignatureError, ValueError) as error:
            # ValueError: a header is missing, or the body is not JSON.
            print(json.dumps({"refused": str(error)}), flush=True)
            self.send_response(400)
            self.end_headers()
            return
        # Answer at once and do the work elsewhere: a slow answer counts as a failure and the
        # event comes again. It may come again anyway (delivery is at least once): the
        # webhook-id is the same each time, so use it to skip duplicates.
        line = {
            "type": event.type,
            "response_id": event.data.id,
            "webhook_id": self.headers["webhook-id"],
        }
        print(json.dumps(line), flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format, *args):
        pass  # stdout is for the events


if __name__ == "__main__":
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8000"))
    server = HTTPServer(("127.0.0.1", port), Receiver)
    print(f"listening on http://127.0.0.1:{server.server_port}/", file=sys.stderr, flush=True)
    server.serve_forever()
