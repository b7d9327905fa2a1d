"""Test keys, messages and expected values from RFC 9421 Appendix B and RFC 9530.

Data only, copied from the RFC text (https://www.rfc-editor.org/rfc/rfc9421, Appendix B); the
values the RFC wraps per RFC 8792 (``\\`` line wrapping) are unwrapped here. The keys (B.1)
are confirmed by the tests themselves: the RFC's signatures verify with them, and the
deterministic ones (Ed25519, HMAC) are reproduced byte for byte.
"""

from __future__ import annotations

import base64
from typing import Final

# -- B.1 keys ------------------------------------------------------------------------------------

# B.1.2 Example RSA-PSS Key ("test-key-rsa-pss"), public part.
TEST_KEY_RSA_PSS_PUBLIC: Final = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAr4tmm3r20Wd/PbqvP1s2
+QEtvpuRaV8Yq40gjUR8y2Rjxa6dpG2GXHbPfvMs8ct+Lh1GH45x28Rw3Ry53mm+
oAXjyQ86OnDkZ5N8lYbggD4O3w6M6pAvLkhk95AndTrifbIFPNU8PPMO7OyrFAHq
gDsznjPFmTOtCEcN2Z1FpWgchwuYLPL+Wokqltd11nqqzi+bJ9cvSKADYdUAAN5W
Utzdpiy6LbTgSxP7ociU4Tn0g5I6aDZJ7A8Lzo0KSyZYoA485mqcO0GVAdVw9lq4
aOT9v6d+nb4bnNkQVklLQ3fVAvJm+xdDOp9LCNCN48V2pnDOkFV6+U9nV5oyc6XI
2wIDAQAB
-----END PUBLIC KEY-----
"""

# B.1.3 Example ECC P-256 Test Key ("test-key-ecc-p256"), public part.
TEST_KEY_ECC_P256_PUBLIC: Final = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqIVYZVLCrPZHGHjP17CTW0/+D9Lf
w0EkjqF7xB4FivAxzic30tMM4GF+hR6Dxh71Z50VGGdldkkDXZCnTNnoXQ==
-----END PUBLIC KEY-----
"""

# B.1.4 Example Ed25519 Test Key ("test-key-ed25519").
TEST_KEY_ED25519_PRIVATE: Final = b"""-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF
-----END PRIVATE KEY-----
"""
TEST_KEY_ED25519_PUBLIC: Final = b"""-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=
-----END PUBLIC KEY-----
"""

# B.1.5 Example Shared Secret ("test-shared-secret"): 64 bytes, Base64.
TEST_SHARED_SECRET: Final = base64.b64decode(
    "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==")

# -- B.2 test messages ---------------------------------------------------------------------------

# B.2 "test-request": POST /foo?param=Value&Pet=dog HTTP/1.1 to example.com. The RFC does not
# name the scheme; no B.2 example covers @scheme or @target-uri, so https is an assumption.
REQUEST_METHOD: Final = "POST"
REQUEST_TARGET_URI: Final = "https://example.com/foo?param=Value&Pet=dog"
REQUEST_BODY: Final = b'{"hello": "world"}'
REQUEST_HEADERS: Final = {
    "host": "example.com",
    "date": "Tue, 20 Apr 2021 02:07:55 GMT",
    "content-type": "application/json",
    "content-digest": ("sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX"
                       "+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:"),
    "content-length": "18",
}

# B.2 "test-response": HTTP/1.1 200 OK.
RESPONSE_STATUS: Final = 200
RESPONSE_BODY: Final = b'{"message": "good dog"}'
RESPONSE_HEADERS: Final = {
    "date": "Tue, 20 Apr 2021 02:07:56 GMT",
    "content-type": "application/json",
    "content-digest": ("sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ4"
                       "1QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:"),
    "content-length": "23",
}

# RFC 9530 (Content-Digest), the sha-256 of the test-request body; its sha-512 is the header
# above.
REQUEST_BODY_SHA256_DIGEST: Final = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"

# -- B.2.1 to B.2.6: Signature-Input, Signature, and the signature base ---------------------------

# B.2.1 Minimal Signature Using rsa-pss-sha512.
B21_SIGNATURE_INPUT: Final = (
    'sig-b21=();created=1618884473;keyid="test-key-rsa-pss";nonce="b3k2pp5k7z-50gnwp.yemd"')
B21_SIGNATURE: Final = (
    "sig-b21=:d2pmTvmbncD3xQm8E9ZV2828BjQWGgiwAaw5bAkgibUopem"
    "LJcWDy/lkbbHAve4cRAtx31Iq786U7it++wgGxbtRxf8Udx7zFZsckzXaJMkA7ChG"
    "52eSkFxykJeNqsrWH5S+oxNFlD4dzVuwe8DhTSja8xxbR/Z2cOGdCbzR72rgFWhzx"
    "2VjBqJzsPLMIQKhO4DGezXehhWwE56YCE+O6c0mKZsfxVrogUvA4HELjVKWmAvtl6"
    "UnCh8jYzuVG5WSb/QEVPnP5TmcAnLH1g+s++v6d4s8m0gCw1fV5/SITLq9mhho8K3"
    "+7EPYTU8IU1bLhdxO5Nyt8C8ssinQ98Xw9Q==:")
B21_BASE: Final = (
    '"@signature-params": ();created=1618884473;keyid="test-key-rsa-pss"'
    ';nonce="b3k2pp5k7z-50gnwp.yemd"')

# B.2.2 Selective Covered Components Using rsa-pss-sha512.
B22_SIGNATURE_INPUT: Final = (
    'sig-b22=("@authority" "content-digest" "@query-param";name="Pet");created=1618884473'
    ';keyid="test-key-rsa-pss";tag="header-example"')
B22_SIGNATURE: Final = (
    "sig-b22=:LjbtqUbfmvjj5C5kr1Ugj4PmLYvx9wVjZvD9GsTT4F7GrcQ"
    "EdJzgI9qHxICagShLRiLMlAJjtq6N4CDfKtjvuJyE5qH7KT8UCMkSowOB4+ECxCmT"
    "8rtAmj/0PIXxi0A0nxKyB09RNrCQibbUjsLS/2YyFYXEu4TRJQzRw1rLEuEfY17SA"
    "RYhpTlaqwZVtR8NV7+4UKkjqpcAoFqWFQh62s7Cl+H2fjBSpqfZUJcsIk4N6wiKYd"
    "4je2U/lankenQ99PZfB4jY3I5rSV2DSBVkSFsURIjYErOs0tFTQosMTAoxk//0RoK"
    "UqiYY8Bh0aaUEb0rQl3/XaVe4bXTugEjHSw==:")
B22_BASE: Final = (
    '"@authority": example.com\n'
    '"content-digest": sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX'
    '+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:\n'
    '"@query-param";name="Pet": dog\n'
    '"@signature-params": ("@authority" "content-digest" "@query-param";name="Pet")'
    ';created=1618884473;keyid="test-key-rsa-pss";tag="header-example"')

# B.2.3 Full Coverage Using rsa-pss-sha512.
B23_SIGNATURE_INPUT: Final = (
    'sig-b23=("date" "@method" "@path" "@query" "@authority" "content-type" "content-digest" '
    '"content-length");created=1618884473;keyid="test-key-rsa-pss"')
B23_SIGNATURE: Final = (
    "sig-b23=:bbN8oArOxYoyylQQUU6QYwrTuaxLwjAC9fbY2F6SVWvh0yBiMIRGOnMYwZ/5MR6fb0Kh1rIRASVxFkeGt"
    "683+qRpRRU5p2voTp768ZrCUb38K0fUxN0O0iC59DzYx8DFll5GmydPxSmme9v6ULbMFkl+V5B1TP/yPViV7KsLNmv"
    "KiLJH1pFkh/aYA2HXXZzNBXmIkoQoLd7YfW91kE9o/CCoC1xMy7JA1ipwvKvfrs65ldmlu9bpG6A9BmzhuzF8Eim5f"
    "8ui9eH8LZH896+QIF61ka39VBrohr9iyMUJpvRX2Zbhl5ZJzSRxpJyoEZAFL2FUo5fTIztsDZKEgM4cUA==:")
B23_BASE: Final = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@method": POST\n'
    '"@path": /foo\n'
    '"@query": ?param=Value&Pet=dog\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"content-digest": sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX'
    '+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:\n'
    '"content-length": 18\n'
    '"@signature-params": ("date" "@method" "@path" "@query" "@authority" "content-type" '
    '"content-digest" "content-length");created=1618884473;keyid="test-key-rsa-pss"')

# B.2.4 Signing a Response Using ecdsa-p256-sha256 (raw r || s signature).
B24_SIGNATURE_INPUT: Final = (
    'sig-b24=("@status" "content-type" "content-digest" "content-length");created=1618884473'
    ';keyid="test-key-ecc-p256"')
B24_SIGNATURE: Final = (
    "sig-b24=:wNmSUAhwb5LxtOtOpNa6W5xj067m5hFrj0XQ4fvpaCLx0NK"
    "ocgPquLgyahnzDnDAUy5eCdlYUEkLIj+32oiasw==:")
B24_BASE: Final = (
    '"@status": 200\n'
    '"content-type": application/json\n'
    '"content-digest": sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ4'
    '1QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:\n'
    '"content-length": 23\n'
    '"@signature-params": ("@status" "content-type" "content-digest" "content-length")'
    ';created=1618884473;keyid="test-key-ecc-p256"')

# B.2.5 Signing a Request Using hmac-sha256.
B25_SIGNATURE_INPUT: Final = (
    'sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret"')
B25_SIGNATURE: Final = "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:"
B25_BASE: Final = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"@signature-params": ("date" "@authority" "content-type");created=1618884473'
    ';keyid="test-shared-secret"')

# B.2.6 Signing a Request Using ed25519.
B26_SIGNATURE_INPUT: Final = (
    'sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length")'
    ';created=1618884473;keyid="test-key-ed25519"')
B26_SIGNATURE: Final = (
    "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1"
    "u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:")
B26_BASE: Final = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@method": POST\n'
    '"@path": /foo\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"content-length": 18\n'
    '"@signature-params": ("date" "@method" "@path" "@authority" "content-type" '
    '"content-length");created=1618884473;keyid="test-key-ed25519"')
