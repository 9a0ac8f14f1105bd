/* irq.c: the 8259 PIC (remapped, masked), the PIT as a one-shot interrupt
 * source for the native tests, and the C side of the entry stubs. */
#include "hv.h"
#include "kernel.h"
#include "raw.h"

#define PIC1_CMD	0x20
#define PIC1_DATA	0x21
#define PIC2_CMD	0xa0
#define PIC2_DATA	0xa1
#define PIT_CH0		0x40
#define PIT_CMD		0x43

volatile unsigned long timer_irqs;
volatile unsigned long events_taken;

/* Remap IRQ 0-15 to vectors 0x20-0x2f and mask all of them: nothing but the
 * self-test's own PIT one-shot ever interrupts this kernel. The BIOS left the
 * PIT running periodically, and its edges latch in the PIC even while masked:
 * switch it to one-shot mode and take that last interrupt, so that afterwards
 * each pit_oneshot() causes exactly one interrupt. */
void pic_init(void)
{
	long n;

	outb(0x11, PIC1_CMD);
	outb(0x11, PIC2_CMD);
	outb(VEC_TIMER, PIC1_DATA);
	outb(VEC_TIMER + 8, PIC2_DATA);
	outb(4, PIC1_DATA);
	outb(2, PIC2_DATA);
	outb(1, PIC1_DATA);
	outb(1, PIC2_DATA);
	outb(0xff, PIC1_DATA);
	outb(0xff, PIC2_DATA);

	pit_oneshot(1);
	for (n = 0; n < 1000000 && !pic_timer_pending(); n++)
		;
	pic_unmask_timer(1);
	raw_sti();
	for (n = 0; n < 1000000 && !timer_irqs; n++)
		barrier();
	raw_cli();
	pic_unmask_timer(0);
	timer_irqs = 0;
}

void pic_unmask_timer(int on)
{
	outb(on ? 0xfe : 0xff, PIC1_DATA);
}

/* IRQ0 requested but not yet serviced (PIC interrupt request register) */
int pic_timer_pending(void)
{
	outb(0x0a, PIC1_CMD);
	return inb(PIC1_CMD) & 1;
}

/* Channel 0, mode 0: the output rises once when `count` reaches zero. */
void pit_oneshot(unsigned count)
{
	outb(0x30, PIT_CMD);
	outb(count & 0xff, PIT_CH0);
	outb((count >> 8) & 0xff, PIT_CH0);
}

void do_irq(unsigned long vector)
{
	if (vector == VEC_TIMER) {
		timer_irqs++;
		outb(0x20, PIC1_CMD);	/* EOI */
		return;
	}
	events_taken++;
	/* Each backend's hypervisor model owns its event state. */
	if (linkfix_backend_is(xen))
		xen_do_event();
	else if (linkfix_backend_is(lguest))
		lguest_do_interrupt();
}

void do_fault(unsigned long vector, unsigned long error, unsigned long ip)
{
	printk("FAULT: exception %lu, error code 0x%lx, ip 0x%lx, cr2 0x%lx\n",
	       vector, error, ip, raw_read_cr2());
	qemu_exit(EXIT_FAULT);
}
