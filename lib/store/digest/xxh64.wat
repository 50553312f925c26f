;; The XXH64 stripe loop (xxHash specification, "XXH64 algorithm", step 2): the only part
;; worth compiling. The caller (xxh64.ts) keeps each hash's four accumulators, the tail and
;; the length, and does the initialisation and the finalisation with BigInt.
;;
;; stripes(state, data, n): the four u64 accumulators at `state` absorb the n 32-byte
;; stripes at `data`; the accumulators are written back to `state`.
;;
;; Built into xxh64-wasm.ts by scripts/build-wasm.mjs (wabt); a test checks the two agree.
(module
  (memory (export "memory") 17)
  (func (export "stripes") (param $state i32) (param $p i32) (param $n i32)
    (local $v1 i64) (local $v2 i64) (local $v3 i64) (local $v4 i64) (local $end i32)
    (local.set $v1 (i64.load offset=0 (local.get $state)))
    (local.set $v2 (i64.load offset=8 (local.get $state)))
    (local.set $v3 (i64.load offset=16 (local.get $state)))
    (local.set $v4 (i64.load offset=24 (local.get $state)))
    (local.set $end (i32.add (local.get $p) (i32.shl (local.get $n) (i32.const 5))))
    (block $done
      (br_if $done (i32.eqz (local.get $n)))
      (loop $stripe
        ;; round(acc, lane) = rotl(acc + lane * PRIME64_2, 31) * PRIME64_1
        (local.set $v1 (i64.mul (i64.rotl (i64.add (local.get $v1)
          (i64.mul (i64.load offset=0 (local.get $p)) (i64.const 0xC2B2AE3D27D4EB4F)))
          (i64.const 31)) (i64.const 0x9E3779B185EBCA87)))
        (local.set $v2 (i64.mul (i64.rotl (i64.add (local.get $v2)
          (i64.mul (i64.load offset=8 (local.get $p)) (i64.const 0xC2B2AE3D27D4EB4F)))
          (i64.const 31)) (i64.const 0x9E3779B185EBCA87)))
        (local.set $v3 (i64.mul (i64.rotl (i64.add (local.get $v3)
          (i64.mul (i64.load offset=16 (local.get $p)) (i64.const 0xC2B2AE3D27D4EB4F)))
          (i64.const 31)) (i64.const 0x9E3779B185EBCA87)))
        (local.set $v4 (i64.mul (i64.rotl (i64.add (local.get $v4)
          (i64.mul (i64.load offset=24 (local.get $p)) (i64.const 0xC2B2AE3D27D4EB4F)))
          (i64.const 31)) (i64.const 0x9E3779B185EBCA87)))
        (local.set $p (i32.add (local.get $p) (i32.const 32)))
        (br_if $stripe (i32.lt_u (local.get $p) (local.get $end)))))
    (i64.store offset=0 (local.get $state) (local.get $v1))
    (i64.store offset=8 (local.get $state) (local.get $v2))
    (i64.store offset=16 (local.get $state) (local.get $v3))
    (i64.store offset=24 (local.get $state) (local.get $v4))))
