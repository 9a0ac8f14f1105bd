/* hungry.c: a register-hungry loop around paravirt sites (save_fl, flag_off,
 * restore_fl and, built with -DWITH_C_CALL, a call to a C function), the
 * shape of an irq-save section in a hot kernel path. Ten loop-carried values
 * plus the loop's own pointer and counter are live across every site, so each
 * register a site may clobber is one the compiler must spill around it or
 * keep out of use.
 *
 * No #include: the build passes the sites with `-include HEADER`, either the
 * gen-stubs linkfix.h (each op clobbers only what it declares) or a model with
 * the same bytes and a wider clobber list (every caller-saved register, or
 * %rax alone as in 2007). Only the compiler's register allocation differs.
 */
unsigned long hungry(const unsigned long *a, long n)
{
	unsigned long s0 = 0x9e3779b9, s1 = 0x7f4a7c15, s2 = 0x85ebca6b, s3 = 0xc2b2ae35;
	unsigned long s4 = 0x27d4eb2f, s5 = 0x165667b1, s6 = 0xd3a2646c, s7 = 0xfd7046c5;
	unsigned long s8 = 0xb55a4f09, s9 = 0x2545f491;

	for (long i = 0; i < n; i++) {
		unsigned long x = a[i];
		unsigned long f = save_fl();

		flag_off();
		s0 += x;
		s1 ^= s0 >> 1;
		s2 += s1 * 3;
		s3 ^= s2 + x;
#ifdef WITH_C_CALL
		c_func();
#endif
		s4 += s3 >> 2;
		s5 ^= s4 + s0;
		s6 += s5 ^ s1;
		restore_fl(f);
		s7 ^= s6 + s2;
		s8 += s7 >> 3;
		s9 ^= s8 + s3;
		s0 ^= s9 << 1;
	}
	return s0 ^ s1 ^ s2 ^ s3 ^ s4 ^ s5 ^ s6 ^ s7 ^ s8 ^ s9;
}
