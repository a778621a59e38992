"""The benchmark drivers behind ``dccsign bench``, installed as ``dccsign.bench`` (from
``bench/drivers`` in the source tree): ``core`` (:mod:`.core`), ``compare`` (:mod:`.compare`)
and ``load`` (:mod:`.loadcli` over the load generator :mod:`.loadgen`), registered with the
``dccsign`` command by :mod:`.commands`. Their histogram and plotting libraries come with the
``[bench]`` extra; the product imports nothing from here."""
