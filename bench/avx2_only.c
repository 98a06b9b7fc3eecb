/* LD_PRELOAD library: this process sees an x86 CPU with AVX2 but no AVX-512, VNNI or AMX.
 *
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID) makes every CPUID instruction trap; the
 * SIGSEGV handler below runs the real CPUID, clears those feature bits and resumes after the
 * instruction. Libraries that pick their kernels by CPUID when they load (ONNX Runtime's
 * MLAS, numpy) then run their AVX2 code paths, as on an AVX2-only kiosk. The CPU still has
 * the instructions, so code that never asks CPUID is unaffected. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static int cpuid_faulting(int faulting) {
    return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, faulting ? 0 : 1);
}

static void mask(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c,
                 unsigned *d) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL */
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                (1u << 30) | (1u << 31));
        /* ECX: AVX512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: AVX512 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512 FP16, AMX-TILE, AMX-INT8 */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) |
                (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI, AVX512 BF16, AMX-FP16, AVX-IFMA */
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        /* EDX: AVX-VNNI-INT8, AVX-NE-CONVERT, AMX-COMPLEX, AVX-VNNI-INT16, AVX10 */
        *d &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        *a = *b = *c = *d = 0; /* AMX tile and AVX10 leaves */
    }
}

static void on_sigsegv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
        cpuid_faulting(0);
        __cpuid_count(leaf, sub, a, b, c, d);
        cpuid_faulting(1);
        mask(leaf, sub, &a, &b, &c, &d);
        r[REG_RAX] = a, r[REG_RBX] = b, r[REG_RCX] = c, r[REG_RDX] = d;
        r[REG_RIP] += 2;
        return;
    }
    signal(sig, SIG_DFL); /* a real fault: crash as without this library */
}

__attribute__((constructor)) static void start(void) {
    struct sigaction action = {0};
    action.sa_sigaction = on_sigsegv;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, NULL);
    if (cpuid_faulting(1) != 0) {
        fprintf(stderr, "avx2_only: this CPU or kernel has no CPUID faulting\n");
        _exit(3);
    }
}
