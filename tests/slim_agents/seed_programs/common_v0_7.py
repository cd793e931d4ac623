"""The examples' common helpers in the v0.7 dialect (as the sessions document uses them).

As common_v0_6.py, with v0.7's names (Name, IdentityProvider, ...) and its
synchronous Slim constructor; only the import of slim_bindings is changed.
"""

from __future__ import annotations

import slim_agents.compat.v0_7 as slim_bindings


def format_message_print(message1: str, message2: str = "") -> None:
    print(f"{message1.capitalize():<45}{message2}", flush=True)


def split_id(id: str) -> slim_bindings.Name:
    """
    Split an ID of form organization/namespace/application (or channel).
    """
    try:
        organization, namespace, app = id.split("/")
    except ValueError as e:
        print("Error: IDs must be in the format organization/namespace/app-or-stream.")
        raise e

    return slim_bindings.Name(organization, namespace, app)


def shared_secret_identity(identity: str, secret: str):
    """
    Create a provider & verifier pair for shared-secret (symmetric) authentication.
    """
    provider = slim_bindings.IdentityProvider.SharedSecret(  # type: ignore
        identity=identity, shared_secret=secret
    )
    verifier = slim_bindings.IdentityVerifier.SharedSecret(  # type: ignore
        identity=identity, shared_secret=secret
    )
    return provider, verifier


async def create_local_app(
    local: str,
    slim: dict,
    enable_opentelemetry: bool = False,
    shared_secret: str = "secret",
):
    """
    Build and connect a Slim application instance given user CLI parameters.
    """
    slim_bindings.init_tracing(
        {
            "log_level": "info",
            "opentelemetry": {
                "enabled": enable_opentelemetry,
                "grpc": {
                    "endpoint": "http://localhost:4317",
                },
            },
        }
    )

    provider, verifier = shared_secret_identity(
        identity=local,
        secret=shared_secret,
    )

    # Convert local identifier to a strongly typed Name.
    local_name = split_id(local)

    # Instantiate Slim (v0.7: a plain constructor).
    local_app = slim_bindings.Slim(local_name, provider, verifier)

    format_message_print(f"{local_app.id_str}", "Created app")

    # Establish outbound connection using provided parameters.
    _ = await local_app.connect(slim)

    format_message_print(f"{local_app.id_str}", f"Connected to {slim['endpoint']}")

    return local_app
