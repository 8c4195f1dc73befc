"""A real gRPC server with the guard's TLS credentials, run in its own process so that
prepare_grpc_tls13() runs before grpc is imported (as the server entry point must).
Prints the port, then serves /t.Echo/Who which answers with the verified peer identity."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from akidb_ros.guard import mtls  # noqa: E402

if os.environ.get('NO_TLS13_PREP') != '1':
    assert mtls.prepare_grpc_tls13()
import grpc  # noqa: E402
from concurrent import futures  # noqa: E402

from akidb_ros.guard.identity import credentials_from_grpc  # noqa: E402
from akidb_ros.guard.mtls import CertIdentitySettings, identity_from_cert  # noqa: E402


def who(request, context):
    creds = credentials_from_grpc(context)
    if creds.peer_cert is None:     # TLS without client certificates
        return f'||{creds.api_key or ""}'.encode()
    ident = identity_from_cert(creds.peer_cert, CertIdentitySettings())
    return (
        f'{ident.subject}|{ident.role.value if ident.role else ""}|{creds.api_key or ""}'.encode()
    )


def main():
    cert, key, ca, interval = sys.argv[1:5]
    require_client_cert = sys.argv[5:6] != ['no-client-cert']
    settings = mtls.TLSSettings(cert, key, ca, require_client_cert,
                                reload_interval_s=float(interval))
    try:
        creds = mtls.grpc_server_credentials(settings)
    except RuntimeError as exc:
        print(f'REFUSED {exc}', flush=True)
        return
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                't.Echo', {'Who': grpc.unary_unary_rpc_method_handler(who)}
            ),
        )
    )
    port = server.add_secure_port('127.0.0.1:0', creds)
    server.start()
    print(f'PORT {port}', flush=True)
    sys.stdin.read()  # until the test closes our stdin
    server.stop(0)


if __name__ == '__main__':
    main()
