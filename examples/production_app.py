"""A production app's use of Flywheel: answer users with the served policy, send their feedback.

Copy this shape: one long-lived client per process (channels are reused), background batching so
feedback never slows a request, a spool so feedback survives a feedback-service outage, and a
clean close on shutdown so nothing queued is lost.

    export FLYWHEEL_API_KEY=...            # from `flywheel keys new my-app`
    python examples/production_app.py --generator localhost:50051 --feedback localhost:50053
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from flywheel_client import ClientConfig, FlywheelClient, FlywheelError, RetryPolicy


def build_client(args: argparse.Namespace) -> FlywheelClient:
    config = ClientConfig(
        generator_address=args.generator,
        feedback_address=args.feedback,
        # api_key=None reads $FLYWHEEL_API_KEY; pass tls=TlsConfig(...) in production.
        timeout_s=10.0,
        retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=5.0),
        batching=True,  # rate()/correct()/... return at once; a thread sends batches
        batch_max_delay_s=0.5,
        spool_path=args.spool,  # undeliverable feedback waits here and is resent
    )
    return FlywheelClient(config)


def handle_turn(client: FlywheelClient, user_id: str, session_id: str, question: str) -> str:
    """One chat turn: generate, show the answer, collect the user's reaction."""
    answer = client.generate(question, max_new_tokens=64, user_id=user_id, session_id=session_id)
    print(f"assistant: {answer.text}")
    reaction = input("[u]p / [d]own / [e]dit / enter to skip: ").strip().lower()
    if reaction == "u":
        client.rate(answer.completion_id, thumb="up", user_id=user_id, session_id=session_id)
    elif reaction == "d":
        client.rate(answer.completion_id, thumb="down", user_id=user_id, session_id=session_id)
    elif reaction == "e":
        better = input("your better answer: ")
        if better.strip():
            client.correct(answer.completion_id, better, user_id=user_id, session_id=session_id)
    return answer.completion_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="localhost:50051")
    parser.add_argument("--feedback", default="localhost:50053")
    parser.add_argument("--spool", default="~/.cache/my-app/flywheel-spool.db")
    parser.add_argument("--user", default="demo-user")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # turns SIGTERM into a clean close below
    with build_client(args) as client:  # close(): flush the queue, resend the spool
        try:
            while question := input("you: ").strip():
                handle_turn(client, args.user, "session-1", question)
        except (EOFError, KeyboardInterrupt):
            pass
        except FlywheelError as error:  # e.g. UNAUTHENTICATED: a config problem, not transient
            logging.error("flywheel call failed: %s", error)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
