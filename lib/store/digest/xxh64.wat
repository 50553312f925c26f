;; XXH64's stripe loop (xxHash specification, "XXH64 algorithm", step 2) and the streaming
;; around it (the bytes carried between updates until they make a stripe): the only part
;; worth compiling. The caller (xxh64.ts) does the initialisation and the finalisation with
;; BigInt, and keeps each hash's length.
;;
;; The memory is imported (one instance per memory), and shared so that a HashPool's worker
;; threads can read the same slots: a caller's data in it is hashed in place. A hash being
;; fed has its state at `h`: the four u64 accumulators (h + 0..31) and the bytes not yet a
;; whole stripe (h + 32..63, `tail` of them).
;;
;; Built into xxh64-wasm.ts by scripts/build-wasm.mjs (wabt); a test checks the two agree.
(module
  (import "env" "memory" (memory 1 65536 shared))

  ;; The accumulators at $h absorb $n 32-byte stripes from $p, each $step bytes after the
  ;; previous one (32; 0 repeats one stripe).
  (func $stripes (param $h i32) (param $p i32) (param $n i32) (param $step i32)
    (local $v1 i64) (local $v2 i64) (local $v3 i64) (local $v4 i64)
    (if (i32.eqz (local.get $n)) (then (return)))
    (local.set $v1 (i64.load offset=0 (local.get $h)))
    (local.set $v2 (i64.load offset=8 (local.get $h)))
    (local.set $v3 (i64.load offset=16 (local.get $h)))
    (local.set $v4 (i64.load offset=24 (local.get $h)))
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
      (local.set $p (i32.add (local.get $p) (local.get $step)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $stripe (local.get $n)))
    (i64.store offset=0 (local.get $h) (local.get $v1))
    (i64.store offset=8 (local.get $h) (local.get $v2))
    (i64.store offset=16 (local.get $h) (local.get $v3))
    (i64.store offset=24 (local.get $h) (local.get $v4)))

  ;; update(h, tail, p, n) -> tail: the hash at $h absorbs the $n bytes at $p, in place (wasm
  ;; loads need no alignment); only the stripe that straddles the tail is copied.
  (func (export "update") (param $h i32) (param $tail i32) (param $p i32) (param $n i32) (result i32)
    (local $take i32)
    (if (local.get $tail)
      (then
        (local.set $take (i32.sub (i32.const 32) (local.get $tail)))
        (if (i32.lt_u (local.get $n) (local.get $take)) (then (local.set $take (local.get $n))))
        (memory.copy (i32.add (i32.add (local.get $h) (i32.const 32)) (local.get $tail)) (local.get $p) (local.get $take))
        (local.set $tail (i32.add (local.get $tail) (local.get $take)))
        (local.set $p (i32.add (local.get $p) (local.get $take)))
        (local.set $n (i32.sub (local.get $n) (local.get $take)))
        (if (i32.lt_u (local.get $tail) (i32.const 32)) (then (return (local.get $tail))))
        (call $stripes (local.get $h) (i32.add (local.get $h) (i32.const 32)) (i32.const 1) (i32.const 32))))
    (call $stripes (local.get $h) (local.get $p) (i32.shr_u (local.get $n) (i32.const 5)) (i32.const 32))
    (local.set $tail (i32.and (local.get $n) (i32.const 31)))
    (memory.copy (i32.add (local.get $h) (i32.const 32)) (i32.sub (i32.add (local.get $p) (local.get $n)) (local.get $tail)) (local.get $tail))
    (local.get $tail))

  ;; repeat(h, tail, byte, n) -> tail: the hash at $h absorbs $n copies of $byte.
  (func (export "repeat") (param $h i32) (param $tail i32) (param $byte i32) (param $n i32) (result i32)
    (local $take i32)
    (local $stripe i32)
    (if (local.get $tail)
      (then
        (local.set $take (i32.sub (i32.const 32) (local.get $tail)))
        (if (i32.lt_u (local.get $n) (local.get $take)) (then (local.set $take (local.get $n))))
        (memory.fill (i32.add (i32.add (local.get $h) (i32.const 32)) (local.get $tail)) (local.get $byte) (local.get $take))
        (local.set $tail (i32.add (local.get $tail) (local.get $take)))
        (local.set $n (i32.sub (local.get $n) (local.get $take)))
        (if (i32.lt_u (local.get $tail) (i32.const 32)) (then (return (local.get $tail))))
        (call $stripes (local.get $h) (i32.add (local.get $h) (i32.const 32)) (i32.const 1) (i32.const 32))))
    ;; Whole stripes of the byte: one stripe of it in the tail's place, absorbed n / 32 times.
    (local.set $stripe (i32.add (local.get $h) (i32.const 32)))
    (memory.fill (local.get $stripe) (local.get $byte) (i32.const 32))
    (call $stripes (local.get $h) (local.get $stripe) (i32.shr_u (local.get $n) (i32.const 5)) (i32.const 0))
    (i32.and (local.get $n) (i32.const 31))))
