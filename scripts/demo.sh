#!/bin/sh
# make demo: a development keystore, one signed sample per DCC type (plus one PS256), QR PNGs,
# and a verification of every HC1 string. Usage: demo.sh DCCSIGN KEYSTORE OUTDIR
set -eu
dccsign=$1 keystore=$2 out=$3
py=$(dirname "$dccsign")/python
if [ ! -f "$keystore/keystore.json" ]; then
    "$dccsign" keys init-dev --keystore "$keystore"
    echo
fi
mkdir -p "$out"
"$py" -m dccsign.testing.samples > "$out/samples.jsonl"
ps256=$("$dccsign" keys list --keystore "$keystore" --json |
        "$py" -c 'import json,sys; print(next(k["kid"] for k in json.load(sys.stdin) if k["alg"]=="PS256" and k["state"]=="active"))')
"$dccsign" sign --keystore "$keystore" --qr "$out/qr.png" "$out/samples.jsonl" > "$out/hc1.txt"
head -n 1 "$out/samples.jsonl" | "$dccsign" sign --keystore "$keystore" --kid "$ps256" --qr "$out/qr-ps256.png" >> "$out/hc1.txt"
n=0
while IFS= read -r line; do
    n=$((n + 1))
    echo "$line"
    # IFS= keeps a trailing space: it is a base45 symbol.
    if "$dccsign" verify --keystore "$keystore" "$line" > "$out/verify-$n.json"; then
        echo "  -> verified: $("$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["alg"], "kid", r["kid"], "type", r["type"], "time_valid", r["time_valid"])' "$out/verify-$n.json")"
    else
        echo "  -> VERIFICATION FAILED (see $out/verify-$n.json)"; exit 1
    fi
done < "$out/hc1.txt"
echo
echo "QR codes: $(ls "$out"/qr*.png | tr '\n' ' ')"
echo
echo "audit log (every signature above was recorded by keyd before it was released):"
"$dccsign" audit verify "$keystore/audit"
