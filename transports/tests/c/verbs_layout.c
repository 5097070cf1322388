/* Prints the layout of every verbs.h struct field and constant that the Rust binding in
 * transports/src/rdma/verbs.rs relies on, one "name value" per line. Compared by the
 * `verbs_layout` test in transports/tests/rdma.rs with verbs::layout() and verbs::constants(). */
#include <stddef.h>
#include <stdio.h>
#include <infiniband/verbs.h>

#define SZ(t) printf("sizeof %s %zu\n", #t, sizeof(struct t))
#define OFF(t, f) printf("%s.%s %zu\n", #t, #f, offsetof(struct t, f))
#define C(c) printf("%s %lld\n", #c, (long long)(c))

int main(void) {
	OFF(ibv_context_ops, poll_cq); OFF(ibv_context_ops, post_send);
	OFF(ibv_context_ops, post_recv); SZ(ibv_context_ops);
	OFF(ibv_context, device); OFF(ibv_context, ops); OFF(ibv_context, cmd_fd);

	SZ(ibv_device_attr);
	OFF(ibv_device_attr, node_guid); OFF(ibv_device_attr, max_mr_size);
	OFF(ibv_device_attr, vendor_id); OFF(ibv_device_attr, max_qp);
	OFF(ibv_device_attr, max_qp_wr); OFF(ibv_device_attr, max_sge);
	OFF(ibv_device_attr, max_sge_rd); OFF(ibv_device_attr, max_cqe);
	OFF(ibv_device_attr, max_qp_rd_atom); OFF(ibv_device_attr, max_qp_init_rd_atom);
	OFF(ibv_device_attr, max_pkeys); OFF(ibv_device_attr, phys_port_cnt);

	SZ(ibv_port_attr);
	OFF(ibv_port_attr, state); OFF(ibv_port_attr, active_mtu); OFF(ibv_port_attr, gid_tbl_len);
	OFF(ibv_port_attr, max_msg_sz); OFF(ibv_port_attr, lid); OFF(ibv_port_attr, active_width);
	OFF(ibv_port_attr, active_speed); OFF(ibv_port_attr, phys_state);
	OFF(ibv_port_attr, link_layer);

	printf("sizeof ibv_gid %zu\n", sizeof(union ibv_gid));
	SZ(ibv_pd); OFF(ibv_pd, context); OFF(ibv_pd, handle);
	SZ(ibv_mr); OFF(ibv_mr, addr); OFF(ibv_mr, length); OFF(ibv_mr, lkey); OFF(ibv_mr, rkey);
	OFF(ibv_cq, context);
	OFF(ibv_qp, context); OFF(ibv_qp, qp_num); OFF(ibv_qp, state);

	SZ(ibv_qp_cap);
	OFF(ibv_qp_cap, max_send_wr); OFF(ibv_qp_cap, max_recv_wr); OFF(ibv_qp_cap, max_send_sge);
	OFF(ibv_qp_cap, max_recv_sge); OFF(ibv_qp_cap, max_inline_data);
	SZ(ibv_qp_init_attr);
	OFF(ibv_qp_init_attr, send_cq); OFF(ibv_qp_init_attr, recv_cq); OFF(ibv_qp_init_attr, srq);
	OFF(ibv_qp_init_attr, cap); OFF(ibv_qp_init_attr, qp_type);
	OFF(ibv_qp_init_attr, sq_sig_all);
	SZ(ibv_global_route);
	OFF(ibv_global_route, dgid); OFF(ibv_global_route, flow_label);
	OFF(ibv_global_route, sgid_index); OFF(ibv_global_route, hop_limit);
	OFF(ibv_global_route, traffic_class);
	SZ(ibv_ah_attr);
	OFF(ibv_ah_attr, grh); OFF(ibv_ah_attr, dlid); OFF(ibv_ah_attr, sl);
	OFF(ibv_ah_attr, is_global); OFF(ibv_ah_attr, port_num);
	SZ(ibv_qp_attr);
	OFF(ibv_qp_attr, qp_state); OFF(ibv_qp_attr, path_mtu); OFF(ibv_qp_attr, rq_psn);
	OFF(ibv_qp_attr, sq_psn); OFF(ibv_qp_attr, dest_qp_num); OFF(ibv_qp_attr, qp_access_flags);
	OFF(ibv_qp_attr, cap); OFF(ibv_qp_attr, ah_attr); OFF(ibv_qp_attr, alt_ah_attr);
	OFF(ibv_qp_attr, pkey_index); OFF(ibv_qp_attr, max_rd_atomic);
	OFF(ibv_qp_attr, max_dest_rd_atomic); OFF(ibv_qp_attr, min_rnr_timer);
	OFF(ibv_qp_attr, port_num); OFF(ibv_qp_attr, timeout); OFF(ibv_qp_attr, retry_cnt);
	OFF(ibv_qp_attr, rnr_retry); OFF(ibv_qp_attr, rate_limit);

	SZ(ibv_sge); OFF(ibv_sge, addr); OFF(ibv_sge, length); OFF(ibv_sge, lkey);
	SZ(ibv_send_wr);
	OFF(ibv_send_wr, wr_id); OFF(ibv_send_wr, next); OFF(ibv_send_wr, sg_list);
	OFF(ibv_send_wr, num_sge); OFF(ibv_send_wr, opcode); OFF(ibv_send_wr, send_flags);
	OFF(ibv_send_wr, imm_data); OFF(ibv_send_wr, wr.rdma.remote_addr);
	OFF(ibv_send_wr, wr.rdma.rkey);
	SZ(ibv_recv_wr);
	OFF(ibv_recv_wr, wr_id); OFF(ibv_recv_wr, next); OFF(ibv_recv_wr, sg_list);
	OFF(ibv_recv_wr, num_sge);
	SZ(ibv_wc);
	OFF(ibv_wc, wr_id); OFF(ibv_wc, status); OFF(ibv_wc, opcode); OFF(ibv_wc, vendor_err);
	OFF(ibv_wc, byte_len); OFF(ibv_wc, imm_data); OFF(ibv_wc, qp_num); OFF(ibv_wc, src_qp);
	OFF(ibv_wc, wc_flags); OFF(ibv_wc, pkey_index); OFF(ibv_wc, slid); OFF(ibv_wc, sl);
	OFF(ibv_wc, dlid_path_bits);

	C(IBV_ACCESS_LOCAL_WRITE); C(IBV_ACCESS_REMOTE_WRITE); C(IBV_ACCESS_REMOTE_READ);
	C(IBV_QPT_RC); C(IBV_QPS_INIT); C(IBV_QPS_RTR); C(IBV_QPS_RTS); C(IBV_QPS_ERR);
	C(IBV_QP_STATE); C(IBV_QP_ACCESS_FLAGS); C(IBV_QP_PKEY_INDEX); C(IBV_QP_PORT);
	C(IBV_QP_AV); C(IBV_QP_PATH_MTU); C(IBV_QP_TIMEOUT); C(IBV_QP_RETRY_CNT);
	C(IBV_QP_RNR_RETRY); C(IBV_QP_RQ_PSN); C(IBV_QP_MAX_QP_RD_ATOMIC);
	C(IBV_QP_MIN_RNR_TIMER); C(IBV_QP_SQ_PSN); C(IBV_QP_MAX_DEST_RD_ATOMIC);
	C(IBV_QP_DEST_QPN);
	C(IBV_WR_RDMA_WRITE); C(IBV_WR_SEND); C(IBV_WR_RDMA_READ); C(IBV_SEND_SIGNALED);
	C(IBV_WC_SUCCESS); C(IBV_WC_WR_FLUSH_ERR); C(IBV_WC_REM_ACCESS_ERR);
	C(IBV_WC_RETRY_EXC_ERR); C(IBV_WC_RNR_RETRY_EXC_ERR); C(IBV_WC_RECV);
	C(IBV_PORT_ACTIVE); C(IBV_LINK_LAYER_INFINIBAND); C(IBV_LINK_LAYER_ETHERNET);
	return 0;
}
