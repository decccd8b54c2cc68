/* Interrupts to the guest (device.c): MSI-X messages through the eventfds
 * the client handed over (SET_IRQS), or the ISR status bits while the driver
 * has MSI-X disabled. Safe from any thread: the eventfds are read under the
 * device's irq lock, which SET_IRQS takes for writing on the context thread. */
#ifndef VN_IRQ_H
#define VN_IRQ_H

#include <stdbool.h>
#include <stdint.h>

struct vn_dev;

void vn_irq_raise(struct vn_dev *dev, uint16_t vector);
/* A used buffer notification for a queue on vector (any thread): with MSI-X
 * on, vector's interrupt unless NO_VECTOR; with it off, the ISR queue bit.
 * Returns whether an interrupt was requested. */
bool vn_irq_notify_queue(struct vn_dev *dev, uint16_t vector);
/* Interrupts held while the eventfds were being replaced, sent now
 * (context thread, after each batch of vfio-user messages). */
void vn_irq_flush_pending(struct vn_dev *dev);

/* The ISR status bits the datapath set since the last call (read clears). */
#define VN_ISR_QUEUE 0x1
#define VN_ISR_CONFIG 0x2
uint8_t vn_dev_take_isr(struct vn_dev *dev);
void vn_dev_raise_isr(struct vn_dev *dev, uint8_t bits);

#endif
