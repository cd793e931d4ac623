"""The tutorial's common helpers (upstream examples' common.py), v0.6 dialect.

Written as the group communication tutorial shows them; only the import of
slim_bindings is changed.
"""

from __future__ import annotations

import base64
import json

import slim_agents.compat.v0_6 as slim_bindings


class color:
    """ANSI escape sequences for terminal styling."""

    PURPLE = "\033[95m"
    CYAN = "\033[96m"
    DARKCYAN = "\033[36m"
    BLUE = "\033[94m"
    GREEN = "\033[92m"
    YELLOW = "\033[93m"
    RED = "\033[91m"
    BOLD = "\033[1m"
    UNDERLINE = "\033[4m"
    END = "\033[0m"


def format_message(message1: str, message2: str = "") -> str:
    return f"{color.BOLD}{color.CYAN}{message1.capitalize():<45}{color.END}{message2}"


def format_message_print(message1: str, message2: str = "") -> None:
    print(format_message(message1, message2), flush=True)


def split_id(id: str) -> slim_bindings.PyName:
    """
    Split an ID of form organization/namespace/application (or channel).
    """
    try:
        organization, namespace, app = id.split("/")
    except ValueError as e:
        print("Error: IDs must be in the format organization/namespace/app-or-stream.")
        raise e

    return slim_bindings.PyName(organization, namespace, app)


def shared_secret_identity(identity: str, secret: str):
    """
    Create a provider & verifier pair for shared-secret (symmetric) authentication.

    Args:
    identity: Logical identity string (often same as PyName string form).
    secret: Shared secret used to sign / verify tokens (not for production).

    Returns:
    (provider, verifier): Tuple of PyIdentityProvider & PyIdentityVerifier.
    """
    provider = slim_bindings.PyIdentityProvider.SharedSecret(  # type: ignore
        identity=identity, shared_secret=secret
    )
    verifier = slim_bindings.PyIdentityVerifier.SharedSecret(  # type: ignore
        identity=identity, shared_secret=secret
    )
    return provider, verifier


def jwt_identity(
    jwt_path: str,
    spire_bundle_path: str,
    iss: str | None = None,
    sub: str | None = None,
    aud: list[str] | None = None,
):
    """
    Construct a static-JWT provider and JWT verifier from file inputs.
    """
    print(f"Using SPIRE bundle file: {spire_bundle_path}")

    # Read raw file content (outer JSON containing base64).
    with open(spire_bundle_path) as sb:
        spire_bundle_string = sb.read()

    # Parse as JSON (expects a dict-like structure).
    spire_bundle = json.loads(spire_bundle_string)

    # Extract the first value & base64 decode it to yield JWKS JSON.
    for _, v in spire_bundle.items():
        spire_jwks = base64.b64decode(v)
        break

    # Static provider returns the same token each request (demo usage).
    provider = slim_bindings.PyIdentityProvider.StaticJwt(  # type: ignore
        path=jwt_path,
    )

    # Wrap decoded JWKS JSON string into a PyKey for the verifier.
    pykey = slim_bindings.PyKey(
        algorithm=slim_bindings.PyAlgorithm.RS256,  # Hard-coded for example clarity.
        format=slim_bindings.PyKeyFormat.Jwks,
        key=slim_bindings.PyKeyData.Content(content=spire_jwks.decode("utf-8")),  # type: ignore
    )

    # Build verifier. We nest audience list in list to preserve shape.
    verifier = slim_bindings.PyIdentityVerifier.Jwt(  # type: ignore
        public_key=pykey,
        issuer=iss,
        audience=[aud],
        subject=sub,
    )

    return provider, verifier


async def create_local_app(
    local: str,
    slim: dict,
    remote: str | None = None,
    enable_opentelemetry: bool = False,
    shared_secret: str = "secret",
    jwt: str | None = None,
    spire_trust_bundle: str | None = None,
    audience: list[str] | None = None,
):
    """
    Build and connect a Slim application instance given user CLI parameters.

    Resolution precedence for auth:
    1. If jwt + bundle + audience provided -> JWT/JWKS flow.
    2. Else -> shared secret (must be provided, raises if missing).
    """
    # Initialize tracing (synchronous init; not awaited as binding returns immediately).
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

    # Derive identity provider & verifier using JWT/JWKS if all pieces supplied.
    if jwt and spire_trust_bundle and audience:
        print("Using JWT + JWKS authentication.")
        provider, verifier = jwt_identity(
            jwt,
            spire_trust_bundle,
            aud=audience,
        )
    else:
        print(
            "Warning: Falling back to shared-secret authentication. Don't use this in production!"
        )
        # Fall back to shared secret (dev-friendly default).
        provider, verifier = shared_secret_identity(
            identity=local,
            secret=shared_secret,
        )

    # Convert local identifier to a strongly typed PyName.
    local_name = split_id(local)

    # Instantiate Slim (async constructor prepares underlying PyService).
    local_app = await slim_bindings.Slim.new(local_name, provider, verifier)

    # Provide feedback to user (instance numeric id).
    format_message_print(f"{local_app.id_str}", "Created app")

    # Establish outbound connection using provided parameters.
    _ = await local_app.connect(slim)

    # Confirm endpoint connectivity.
    format_message_print(f"{local_app.id_str}", f"Connected to {slim['endpoint']}")

    return local_app
