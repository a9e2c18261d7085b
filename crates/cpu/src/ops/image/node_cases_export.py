# Exports ONNX backend node tests to the text format read by node_cases.rs.
# Usage: python3 node_cases_export.py test_lstm,test_resize,... out.txt
import onnx, numpy as np, os, sys, glob, math
from onnx import numpy_helper, helper
root='/work/main/assets/onnx-backend/node'
pat=sys.argv[1].split(',')
out=open(sys.argv[2],'w')
DT={np.float32:'f32',np.float64:'f64',np.float16:'f16',np.int64:'i64',np.int32:'i32',np.int8:'i8',np.uint8:'u8',np.bool_:'bool',np.int16:'i16',np.uint16:'u16',np.uint32:'u32',np.uint64:'u64'}
def fmt(v):
    if isinstance(v,float):
        return repr(v)
    return str(v)
def tens(a):
    a=np.asarray(a)
    dt=DT.get(a.dtype.type)
    if dt is None: return None
    flat=a.reshape(-1)
    if dt in('f32','f64','f16'):
        vals=' '.join(repr(float(x)) for x in flat)
    elif dt=='bool':
        vals=' '.join(str(int(x)) for x in flat)
    else:
        vals=' '.join(str(int(x)) for x in flat)
    return f"{dt} {a.ndim} {' '.join(map(str,a.shape))} {vals}"
n=0
for d in sorted(glob.glob(root+'/test_*')):
    name=os.path.basename(d)
    if name.endswith('_expanded') or not any(p in name for p in pat): continue
    m=onnx.load(d+'/model.onnx')
    if len(m.graph.node)!=1: print('skip multi-node',name); continue
    node=m.graph.node[0]
    opset=[o.version for o in m.opset_import if o.domain in('','ai.onnx')][0]
    for ds in sorted(glob.glob(d+'/test_data_set_*')):
        vals={}
        for i,gi in enumerate(m.graph.input):
            p=f'{ds}/input_{i}.pb'
            if not os.path.exists(p): continue
            t=onnx.TensorProto(); t.ParseFromString(open(p,'rb').read())
            vals[gi.name]=numpy_helper.to_array(t)
        outs={}
        for i,go in enumerate(m.graph.output):
            p=f'{ds}/output_{i}.pb'
            t=onnx.TensorProto(); t.ParseFromString(open(p,'rb').read())
            outs[go.name]=numpy_helper.to_array(t)
        lines=[f"case {name}/{os.path.basename(ds)} {node.op_type} {opset} {len(node.input)} {len(node.output)}"]
        ok=True
        for a in node.attribute:
            v=helper.get_attribute_value(a)
            if a.type==a.INT: lines.append(f"attr {a.name} int {v}")
            elif a.type==a.FLOAT: lines.append(f"attr {a.name} float {repr(float(v))}")
            elif a.type==a.STRING: lines.append(f"attr {a.name} string {v.decode()}")
            elif a.type==a.INTS: lines.append(f"attr {a.name} ints {len(v)} {' '.join(map(str,v))}")
            elif a.type==a.FLOATS: lines.append(f"attr {a.name} floats {len(v)} {' '.join(repr(float(x)) for x in v)}")
            elif a.type==a.STRINGS: lines.append(f"attr {a.name} strings {len(v)} {' '.join(x.decode() for x in v)}")
            else: ok=False
        for i,nm in enumerate(node.input):
            if nm=='' : lines.append(f"input {i} none"); continue
            if nm not in vals:
                # initializer
                inits={x.name:numpy_helper.to_array(x) for x in m.graph.initializer}
                if nm in inits: vals[nm]=inits[nm]
                else: ok=False; break
            t=tens(vals[nm])
            if t is None: ok=False; break
            lines.append(f"input {i} {t}")
        for i,nm in enumerate(node.output):
            if nm in outs:
                t=tens(outs[nm])
                if t is None: ok=False; break
                lines.append(f"output {i} {t}")
        if not ok: print('skip',name); continue
        lines.append('end')
        out.write('\n'.join(lines)+'\n'); n+=1
print(n,'cases')
