/* Stand-in for <cmocka.h> when tests/c/fake_driver.c is linked into the
 * libFuzzer targets: there is no cmocka test runner there, so a failed
 * check prints where it failed and aborts, which libFuzzer reports as a
 * crash with the input that caused it. Only what fake_driver.c uses. */
#ifndef VN_FUZZ_CMOCKA_SHIM_H
#define VN_FUZZ_CMOCKA_SHIM_H

#include <stdio.h>
#include <stdlib.h>

#define vn_shim_fail(...)                                                   \
    do {                                                                    \
        fprintf(stderr, "%s:%d: check failed: ", __FILE__, __LINE__);       \
        fprintf(stderr, __VA_ARGS__);                                       \
        fputc('\n', stderr);                                                \
        abort();                                                            \
    } while (0)

#define fail_msg(...) vn_shim_fail(__VA_ARGS__)
#define assert_true(c)                                                      \
    do {                                                                    \
        if (!(c))                                                           \
            vn_shim_fail("%s", #c);                                         \
    } while (0)
#define assert_non_null(p) assert_true((p) != NULL)
#define assert_int_equal(a, b)                                              \
    do {                                                                    \
        long long vn_shim_a_ = (long long)(a), vn_shim_b_ = (long long)(b); \
        if (vn_shim_a_ != vn_shim_b_)                                       \
            vn_shim_fail("%s == %s (%lld != %lld)", #a, #b, vn_shim_a_,     \
                         vn_shim_b_);                                       \
    } while (0)

#endif
