"""Build an SROS2-layout keystore with real signed documents (no sros2 package on PyPI):
public/ca.cert.pem, enclaves/<name>/{identity_ca,permissions_ca}.cert.pem, cert.pem, key.pem,
governance.{xml,p7s}, permissions.{xml,p7s} (S/MIME, signed by the CA, as `ros2 security` does)."""

import datetime as dt
import os
import shutil

from certs import make_ca, make_leaf
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

GOVERNANCE = '''<?xml version="1.0" encoding="UTF-8"?>
<dds><domain_access_rules><domain_rule>
<domains><id_range><min>0</min><max>230</max></id_range></domains>
<allow_unauthenticated_participants>false</allow_unauthenticated_participants>
<enable_join_access_control>true</enable_join_access_control>
<discovery_protection_kind>ENCRYPT</discovery_protection_kind>
<liveliness_protection_kind>ENCRYPT</liveliness_protection_kind>
<rtps_protection_kind>SIGN</rtps_protection_kind>
<topic_access_rules><topic_rule><topic_expression>*</topic_expression>
<enable_discovery_protection>true</enable_discovery_protection>
<enable_liveliness_protection>true</enable_liveliness_protection>
<enable_read_access_control>true</enable_read_access_control>
<enable_write_access_control>true</enable_write_access_control>
<metadata_protection_kind>ENCRYPT</metadata_protection_kind>
<data_protection_kind>ENCRYPT</data_protection_kind>
</topic_rule></topic_access_rules></domain_rule></domain_access_rules></dds>
'''


def _sign(ca, text: str, out: str) -> None:
    data = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(text.encode())
        .add_signer(ca.cert, ca.key, hashes.SHA256())
        .sign(
            serialization.Encoding.SMIME,
            [pkcs7.PKCS7Options.Text, pkcs7.PKCS7Options.DetachedSignature],
        )
    )
    with open(out, 'wb') as fh:
        fh.write(data)


def make_keystore(root: str, enclave: str = '/akidb') -> str:
    pub, priv = os.path.join(root, 'public'), os.path.join(root, 'private')
    enc = os.path.join(root, 'enclaves', enclave.strip('/'))
    for d in (pub, priv, enc):
        os.makedirs(d, exist_ok=True)
    ca = make_ca(priv, cn='sros2 CA')
    shutil.copy(ca.path, os.path.join(pub, 'ca.cert.pem'))
    for name in ('identity_ca.cert.pem', 'permissions_ca.cert.pem'):
        shutil.copy(ca.path, os.path.join(enc, name))
    c, k, _ = make_leaf(enc, ca, enclave, server=False, name='leaf')
    os.replace(c, os.path.join(enc, 'cert.pem'))
    os.replace(k, os.path.join(enc, 'key.pem'))
    with open(os.path.join(enc, 'governance.xml'), 'w') as fh:
        fh.write(GOVERNANCE)
    _sign(ca, GOVERNANCE, os.path.join(enc, 'governance.p7s'))
    now = dt.datetime.now(dt.timezone.utc)
    perms = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<dds><permissions><grant name="{enclave}">'
        f'<subject_name>O=akidb test,CN={enclave}</subject_name><validity>'
        f'<not_before>{now:%Y-%m-%dT%H:%M:%S}</not_before><not_after>{now.year + 1}-12-31T00:00:00'
        f'</not_after></validity><allow_rule><domains><id_range><min>0</min><max>230</max>'
        f'</id_range>'
        f'</domains><publish><topics><topic>*</topic></topics></publish><subscribe><topics>'
        f'<topic>*</topic></topics></subscribe></allow_rule><default>DENY</default></grant>'
        f'</permissions></dds>\n'
    )
    with open(os.path.join(enc, 'permissions.xml'), 'w') as fh:
        fh.write(perms)
    _sign(ca, perms, os.path.join(enc, 'permissions.p7s'))
    return enc
