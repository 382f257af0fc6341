"""Makes usersig.json with Tencent's own TLSSigAPIv2 (PyPI: tls-sig-api-v2==1.1).

    pip download --no-deps tls-sig-api-v2==1.1 && tar xzf tls-sig-api-v2-1.1.tar.gz
    PYTHONPATH=tls-sig-api-v2-1.1 python3 make_usersig_vector.py > usersig.json

The clock is pinned so the vector is reproducible.
"""
import json
import time

import TLSSigAPIv2

SDKAPPID = 1400000000
KEY = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"
IDENTIFIER = "administrator"
NOW = 1700000000
EXPIRE = 86400

time.time = lambda: NOW
sig = TLSSigAPIv2.TLSSigAPIv2(SDKAPPID, KEY).gen_sig(IDENTIFIER, EXPIRE)
print(json.dumps({
    "made_with": "tls-sig-api-v2==1.1 (PyPI), TLSSigAPIv2.gen_sig, time pinned",
    "sdkappid": SDKAPPID, "key": KEY, "identifier": IDENTIFIER,
    "time": NOW, "expire": EXPIRE, "usersig": sig,
}, indent=2))
